#!/usr/bin/env bash
# Everything that needs the GPU, in one call to the device machine: build csrc/, run the whole
# test suite on the GPU, compute-sanitizer memcheck on the CUDA kernels, the kernel
# microbenchmarks and the speedup-vs-BOPs reports. Full outputs go to bench/results/gpu-<date>;
# when $OUT is set (the device tool's folder, which brings back at most 8 files) they are also
# packed into $OUT/results.tgz beside $OUT/suite.log. A short summary prints last.
#
#   bash bench/gpu_suite.sh            # on a machine with a CUDA GPU and nvcc
set -uo pipefail
cd "$(dirname "$0")/.."
STAMP=gpu-$(date +%F)
RESULTS=bench/results/$STAMP
mkdir -p "$RESULTS"
LOG="$RESULTS/suite.log"
: > "$LOG"
step() { echo "== $*" | tee -a "$LOG"; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$LOG"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOG"

step "stock CUTLASS headers for the cutlass provider (the device has no network)"
# Carry the wheel as an ignored file: pip download --no-deps -d .wheels nvidia-cutlass==4.2.0.0
if ls .wheels/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  pip install --no-deps --no-index .wheels/nvidia_cutlass-*.whl >> "$LOG" 2>&1 && echo "nvidia-cutlass installed" | tee -a "$LOG"
else
  echo "no .wheels/nvidia_cutlass-*.whl: the cutlass columns will say unavailable" | tee -a "$LOG"
fi

step "build csrc/ (sm_90 only, to save time on the device)"
HYBRIDOPS_BUILD_CUDA=1 HYBRIDOPS_CUDA_ARCHS="9.0" MAX_JOBS=16 \
  pip install -e . --no-build-isolation --no-deps >> "$LOG" 2>&1 || { tail -40 "$LOG"; exit 1; }
python -c "import hybridops as ho; print('backends on cuda:', ho.available_backends('cuda'))" | tee -a "$LOG"

step "tests on the GPU"
python -m pytest -q -x tests bench -p no:cacheprovider > "$RESULTS/tests.txt" 2>&1
tail -3 "$RESULTS/tests.txt" | tee -a "$LOG"

step "compute-sanitizer memcheck on the CUDA kernel tests"
compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -x tests/test_kernels.py \
  tests/test_cuda_kernels.py -k "not opcheck and not triton" -p no:cacheprovider > "$RESULTS/memcheck.txt" 2>&1
echo "memcheck exit code $?" | tee -a "$LOG"
grep -E "ERROR SUMMARY|passed|failed" "$RESULTS/memcheck.txt" | tail -3 | tee -a "$LOG"

step "kernel microbenchmarks"
python bench/bench_kernels.py --batch 1 32 --bits 4 5 --keep 0.1 --out "$RESULTS/kernels" >> "$LOG" 2>&1
python bench/bench_kernels.py --batch 32 --bits 4 --keep 0.25 0.5 --shapes resnet50.layer3 rtmdnet.conv2 \
  --out "$RESULTS/keep-sweep" >> "$LOG" 2>&1

for spec in "resnet50 1" "resnet50 32" "rtmdnet 1"; do
  set -- $spec
  step "speedup report $1 batch $2"
  python bench/speedup_report.py --model "$1" --batch "$2" --no-plot --out "$RESULTS/report-$1-b$2" >> "$LOG" 2>&1
  tail -4 "$LOG"
done

if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C bench/results "$STAMP" && cp "$LOG" "$OUT/suite.log"
fi

step "summary"
grep -E "^(resnet50.layer3|rtmdnet.conv2)" "$LOG" | grep -E "cudnn_bf16_cl|hybrid_|qconv_" | head -24
