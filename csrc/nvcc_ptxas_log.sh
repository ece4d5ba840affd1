#!/usr/bin/env bash
# nvcc with `-Xptxas -v`, saving ptxas's resource report of each compiled source to
# $HYBRIDOPS_PTXAS_LOG_DIR/<source>.ptxas.log (and still printing it). setup.py points torch's
# ninja build at this script (PYTORCH_NVCC) so that tests/test_cuda_kernels.py can read the
# registers, stack frames and spills of the kernels that were actually built, without cuobjdump.
# The real compiler is $HYBRIDOPS_NVCC (setup.py sets it), else nvcc on PATH.
set -o pipefail
src=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "-c" ]; then src=$arg; fi
  prev=$arg
done
nvcc_bin=${HYBRIDOPS_NVCC:-nvcc}
if [ -z "$src" ] || [ -z "${HYBRIDOPS_PTXAS_LOG_DIR:-}" ]; then
  exec "$nvcc_bin" "$@"
fi
mkdir -p "$HYBRIDOPS_PTXAS_LOG_DIR"
log="$HYBRIDOPS_PTXAS_LOG_DIR/$(basename "$src").ptxas.log"
# Written to a temporary name first: an interrupted build leaves no half report behind.
"$nvcc_bin" "$@" -Xptxas=-v 2>&1 | tee "$log.tmp"
rc=$?
if [ $rc -eq 0 ]; then mv "$log.tmp" "$log"; else rm -f "$log.tmp"; fi
exit $rc
