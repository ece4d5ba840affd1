#!/usr/bin/env bash
# The GPU check, sized to the GPU time a verification run gets (docs/gpu.md: 15 minutes of device time
# per task on a machine that starts bare, at most 10 minutes a command): one script that finishes
# in 8 minutes including the build, stages in value order, each under its own `timeout`, results
# written after every stage so that a stage (or the whole command) killed at its limit still
# returns what ran.
#
#   bash bench/gpu_suite.sh             # (a)-(e), <= 8 min on a bare H100/H200 with 16 cores
#   bash bench/gpu_suite.sh --quick     # (a)-(c), <= 4 min
#   bash bench/gpu_suite.sh --dry-run   # every stage's wiring on the CPU (TRITON_INTERPRET=1,
#                                       # tiny shapes), < 2 min; CI runs it (bench/test_bench_harness.py)
#
# Stages: (a) build csrc/ for sm_90 with ninja (MAX_JOBS=16), and the stock CUTLASS provider in
# the background; (b) correctness: every kernel variant of each backend against the reference on a
# fixed short shape list (bench/gpu/check_kernels.py, sharded over processes); (c) the
# microbenchmark table: ours vs cuDNN bf16 channels_last vs stock CUTLASS s8 on the ResNet-50 and
# RT-MDNet layers, batch 1 and 32; (d) ResNet-50 end to end with CUDA graphs, batch 1 and 32
# (bench/speedup_report.py); (d2) the quantized-attention op and the hybrid Linear against bf16
# SDPA / cuBLAS (bench/gpu/transformer.py); (e) compute-sanitizer memcheck, racecheck and synccheck on every
# CUDA kernel template, once each, on small shapes. A one-screen summary (bench/gpu/summarize.py) prints last and is
# written to $OUT/summary.txt after every stage.
#
# Outputs: everything under $WORK (bench/results/gpu-suite-<date> unless $SUITE_DIR is set); when
# $OUT is set (the device tool's folder, which brings back at most 8 files) it gets summary.txt,
# suite.log and results.tgz (all of $WORK), refreshed after every stage.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=full
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --dry-run) MODE=dry ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "unknown argument $arg (use --quick or --dry-run)" >&2; exit 2 ;;
  esac
done

STAMP=$(date +%F-%H%M%S)
WORK=${SUITE_DIR:-bench/results/gpu-suite-$STAMP}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
LOG="$WORK/suite.log"
: > "$LOG"
: > "$WORK/stages.tsv"
echo "$MODE" > "$WORK/mode"
T0=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"

# Seconds per stage (timeout each). The full run's budgets add up to 470 s (+ a few seconds of
# bookkeeping), the quick run's (a)-(c) to 230 s; the dry run's are generous ceilings for 2 CPU
# cores, not targets. DEADLINE is a guard over all of them: a stage that would start past it is
# skipped with a line saying so.
if [ "$MODE" = dry ]; then
  B_ENV=20; B_BUILD=30; B_CHECK=60; B_BENCH=40; B_E2E=40; B_TF=30; B_SAN=30; DEADLINE=115; SHARDS=1
  export TRITON_INTERPRET=1
elif [ "$MODE" = quick ]; then
  B_ENV=10; B_BUILD=130; B_CHECK=45; B_BENCH=45; DEADLINE=235; SHARDS=4
else
  B_ENV=10; B_BUILD=150; B_CHECK=90; B_BENCH=100; B_E2E=55; B_TF=20; B_SAN=45; DEADLINE=475; SHARDS=4
fi

say() { echo "$*" | tee -a "$LOG"; }

publish() {
  # Refresh what the device tool brings back; cheap, so after every stage.
  python bench/gpu/summarize.py "$WORK" > "$WORK/summary.txt" 2>> "$LOG" || echo "summary failed" >> "$WORK/summary.txt"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$WORK/summary.txt" "$LOG" "$OUT/" 2>/dev/null
    # Without the CUTLASS build folder (objects and a library: tens of MB, over the 16 MiB a file
    # the device tool brings back).
    tar czf "$OUT/results.tgz" --exclude=cutlass-build -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
  fi
}

# stage NAME BUDGET FUNCTION: runs FUNCTION (exported, in a child bash) under `timeout BUDGET` with its output in
# $WORK/NAME.log, records "NAME status seconds budget" in stages.tsv, then publishes.
stage() {
  local name=$1 budget=$2; shift 2
  local now=$(( $(date +%s) - T0 ))
  if [ $(( now + 5 )) -ge "$DEADLINE" ]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "$budget" >> "$WORK/stages.tsv"
    say "== $name: skipped (suite deadline ${DEADLINE}s reached at ${now}s)"
    publish
    return 0
  fi
  if [ $(( now + budget )) -gt "$DEADLINE" ]; then budget=$(( DEADLINE - now )); fi
  say "== $name (budget ${budget}s, at ${now}s)"
  local t=$(date +%s)
  # timeout signals the whole process group: parallel shards and compilers stop with the stage.
  timeout --kill-after=5 "$budget" bash -c "set -o pipefail; $*" > "$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t )) status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; elif [ $rc -ne 0 ]; then status="fail($rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$budget" >> "$WORK/stages.tsv"
  tail -n 4 "$WORK/$name.log" | sed 's/^/   /' | tee -a "$LOG"
  say "== $name: $status in ${dt}s"
  publish
  return 0
}

# ----------------------------------------------------------------------------- environment
stage_env() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "nvidia-smi: not found (no GPU here)"
  fi
  python -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  for tool in nvcc ninja compute-sanitizer; do
    printf '%s: %s\n' "$tool" "$(command -v $tool || echo 'not found')"
  done
  nproc
}

# ----------------------------------------------------------------------------- (a) build
cutlass_background() {
  # Stock CUTLASS for the (c) baseline: one heavy translation unit (minutes), so it compiles in
  # the background beside the csrc build; (c) uses it only if it finished by then.
  export HYBRIDOPS_CUTLASS_BUILD_DIR="$WORK/cutlass-build"
  mkdir -p "$HYBRIDOPS_CUTLASS_BUILD_DIR"
  (
    timeout 330 python -c "import cutlass_conv; cutlass_conv.build(); print('cutlass built')" && touch "$WORK/cutlass.ok"
  ) > "$WORK/cutlass-build.log" 2>&1 &
}

# ----------------------------------------------------------------------------- (a) CUTLASS Hopper qconv2d
# hybridops._C_sm90 (csrc/sm90/, issue 12 item 1): 7 CUTLASS translation units, about a minute of
# nvcc each, built beside the csrc one in the background with its own build folder (two ninja
# graphs must not share one), so that stage (a) takes the longer of the two, not their sum.
cutlass_wheel() {
  # CUTLASS's headers for both CUTLASS builds (this one and cutlass_background's stock baseline):
  # the carried nvidia-cutlass wheel (no network on the GPU machine), installed once, before both.
  if ls .wheels/nvidia_cutlass-*.whl > /dev/null 2>&1; then
    pip install -q --no-deps --no-index .wheels/nvidia_cutlass-*.whl >> "$LOG" 2>&1
  fi
}

sm90_background() {
  (
    HYBRIDOPS_BUILD_SM90=only HYBRIDOPS_CUDA_ARCHS="9.0a" MAX_JOBS=8 \
      timeout 280 python setup.py build_ext --inplace --build-temp build/sm90 2>&1 | tail -n 15
    [ "${PIPESTATUS[0]}" -eq 0 ] && touch "$WORK/sm90.ok"
    touch "$WORK/sm90.done"
  ) > "$WORK/sm90-build.log" 2>&1 &
}

sm90_wait() {
  # Called at the end of stage (a): the stage's own timeout bounds the wait.
  while [ ! -f "$WORK/sm90.done" ]; do sleep 2; done
  if [ -f "$WORK/sm90.ok" ]; then echo "hybridops._C_sm90 (CUTLASS Hopper qconv2d): built"; return 0; fi
  echo "hybridops._C_sm90 (CUTLASS Hopper qconv2d): build failed, see sm90-build.log:"; tail -n 5 "$WORK/sm90-build.log"
  return 1
}
# ----------------------------------------------------------------------------- end of the CUTLASS block

stage_build() {
  if [ "$MODE" = dry ]; then
    # No nvcc build on the CPU run (minutes); check the wiring of the one that runs on the GPU.
    echo "skipped on the CPU dry run: the csrc/ build (setup.py, ninja, MAX_JOBS=16) needs minutes of nvcc."
    HYBRIDOPS_BUILD_CUDA=auto HYBRIDOPS_CUDA_ARCHS="9.0" MAX_JOBS=16 python setup.py --name
    python -c "import cutlass_conv; print('cutlass provider module imports; build dir', cutlass_conv.build_dir())"
    HYBRIDOPS_BUILD_CUDA=auto HYBRIDOPS_CUDA_ARCHS="9.0a" python setup.py --name 2>&1 | grep -i "_C_sm90"
    return 0
  fi
  HYBRIDOPS_BUILD_CUDA=1 HYBRIDOPS_CUDA_ARCHS="9.0" MAX_JOBS=16 \
    pip install -e . --no-build-isolation --no-deps 2>&1 | tail -n 20
  local rc=${PIPESTATUS[0]}
  sm90_wait || rc=1
  python -c "import hybridops as ho; from hybridops.ops import cuda_ext; print('backends on cuda:', ho.available_backends('cuda')); print('build', cuda_ext.build_info())"
  return "$rc"
}

# ----------------------------------------------------------------------------- (b) correctness
stage_check() {
  local subset=full pids=() rc=0 i
  [ "$MODE" = quick ] && subset=quick
  [ "$MODE" = dry ] && subset=dry
  for i in $(seq 0 $(( SHARDS - 1 ))); do
    python bench/gpu/check_kernels.py --subset "$subset" --shard "$i/$SHARDS" --out "$WORK" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  return $rc
}

# ----------------------------------------------------------------------------- (c) microbenchmarks
stage_bench() {
  local extra=() backends
  backends=$(python -c "import hybridops as ho, torch; d='cuda' if torch.cuda.is_available() else 'cpu'; print(' '.join(b for b in ho.available_backends(d) if b in ('triton', 'cuda')) or 'torch')")
  if [ "$MODE" = dry ]; then
    echo "CPU dry run: one tiny RT-MDNet layer, backends: torch triton (interpreter); cuDNN and CUTLASS columns need a GPU."
    python bench/bench_kernels.py --device cpu --shapes rtmdnet.fc6 --batch 1 --bits 4 --backends torch triton \
      --no-cutlass --jsonl "$WORK/kernels.jsonl" --out "$WORK/kernels"
    return $?
  fi
  if [ -f "$WORK/cutlass.ok" ]; then echo "stock CUTLASS provider: built"; else
    echo "stock CUTLASS provider: not built in time (see cutlass-build.log); its columns are left out"
    extra+=(--no-cutlass)
  fi
  # Value order: the 3x3 ResNet-50 layers and RT-MDNet convs first; quick stops there.
  python bench/bench_kernels.py --shapes resnet50.layer2 resnet50.layer3 rtmdnet.conv2 rtmdnet.conv3 \
    --batch 1 32 --bits 4 --keep 0.1 --backends $backends "${extra[@]}" \
    --jsonl "$WORK/kernels.jsonl" --out "$WORK/kernels" || return $?
  if [ "$MODE" = full ]; then
    python bench/bench_kernels.py --shapes resnet50.layer1 resnet50.layer4 resnet50.1x1 rtmdnet.conv1 rtmdnet.fc \
      --batch 1 32 --bits 4 --keep 0.1 --backends $backends "${extra[@]}" \
      --jsonl "$WORK/kernels.jsonl" --out "$WORK/kernels-rest"
  fi
}

# ----------------------------------------------------------------------------- (d) end to end
stage_e2e() {
  if [ "$MODE" = dry ]; then
    echo "CPU dry run: a tiny model with the reference backend; CUDA graphs skipped (they need a GPU)."
    python bench/speedup_report.py --model tiny --batch 1 --size 16 --device cpu --backend torch --no-plot \
      --out "$WORK/e2e-b1"
    return $?
  fi
  python bench/speedup_report.py --model resnet50 --batch 1 --no-plot --out "$WORK/e2e-b1" | tail -n 6 || return $?
  python bench/speedup_report.py --model resnet50 --batch 32 --no-plot --out "$WORK/e2e-b32" | tail -n 6
}

# ----------------------------------------------------------------------------- (d2) transformers
stage_transformer() {
  # the quantized-attention op (Triton) against bf16 SDPA, the hybrid Linear against cuBLAS bf16
  # and torch._int_mm, each checked against the reference first (bench/gpu/transformer.py)
  python bench/gpu/transformer.py --out "$WORK" $( [ "$MODE" = dry ] && echo --dry )
}

# ----------------------------------------------------------------------------- (e) sanitizers
stage_sanitize() {
  local tool pids=() rc=0 p
  if ! command -v compute-sanitizer > /dev/null || [ "$MODE" = dry ]; then
    echo "compute-sanitizer skipped: $( [ "$MODE" = dry ] && echo 'CPU dry run' || echo 'not found' ); the subset runs unsanitized to check its wiring."
    python bench/gpu/check_kernels.py --subset sanitizer --dry-run-sanitizer --shard 0/1 --out "$WORK"
    return $?
  fi
  # Every CUDA kernel template once (check_kernels.py's sanitizer subset: each qconv2d kernel
  # forced on small shapes, every operand variant and both load paths; the quantizers per dtype;
  # the CUTLASS Hopper kernel per tile and output type) under each tool: three tools x two shards,
  # six processes in parallel. Only hybridops' kernels are instrumented (--kernel-name; the
  # reference's torch kernels run at full speed). memcheck runs without torch's caching
  # allocator, so that an access past a tensor is past its own cudaMalloc, not inside a cached
  # block where memcheck cannot see it.
  local shard
  for tool in memcheck racecheck synccheck; do
    for shard in 0 1; do
      env $( [ "$tool" = memcheck ] && echo PYTORCH_NO_CUDA_MEMORY_CACHING=1 ) \
        compute-sanitizer --tool "$tool" --kernel-name kns=hybridops --error-exitcode 9 --print-limit 20 \
        python bench/gpu/check_kernels.py --subset sanitizer --shard "$shard/2" --tag "$tool" --out "$WORK" \
        > "$WORK/sanitizer-$tool-$shard.log" 2>&1 &
      pids+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|passed" "$WORK"/sanitizer-*.log
  return $rc
}

export MODE WORK SHARDS ROOT
export -f stage_env stage_build stage_check stage_bench stage_e2e stage_transformer stage_sanitize sm90_wait
say "hybridops GPU suite, mode $MODE, results in $WORK"
stage env "$B_ENV" stage_env
[ "$MODE" = dry ] || cutlass_wheel
[ "$MODE" = dry ] || cutlass_background
[ "$MODE" = dry ] || sm90_background
stage build "$B_BUILD" stage_build
stage correctness "$B_CHECK" stage_check
stage bench "$B_BENCH" stage_bench
if [ "$MODE" != quick ]; then
  stage e2e "$B_E2E" stage_e2e
  stage transformer "$B_TF" stage_transformer
  stage sanitizer "$B_SAN" stage_sanitize
fi
say "== done in $(( $(date +%s) - T0 ))s"
publish
cat "$WORK/summary.txt"
# The exit code says whether every stage passed; the dry run must pass on the CPU (CI).
if grep -q -v -P '\tok\t' "$WORK/stages.tsv"; then exit 1; fi
exit 0
