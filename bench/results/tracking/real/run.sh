#!/bin/bash
# The example run on the real OTB sequence Crossing (120 frames), CPU, one thread.
# Usage: bash bench/results/tracking/real/run.sh [DATA] [WORK] 2>&1 | tee bench/results/tracking/real/log.txt
# (from the repository root)
# DATA: the Crossing folder (default /work/shared/data/otb/Crossing); WORK: where the checkpoints
# go (default /tmp/crossing_run; they are not committed). Results are written next to this script.
set -euo pipefail
DATA=${1:-/work/shared/data/otb/Crossing}
WORK=${2:-/tmp/crossing_run}
OUT=$(dirname "$0")
mkdir -p "$WORK"
T="hybridops-track"
# 1. float SiamRPN++ (small CPU preset) trained on pairs from Crossing itself, with shift/scale/blur/flip
$T train --data "$DATA" --out "$WORK/float.pt" --steps 400 --batch-size 8 --blur 0.2 --flip 0.5 --threads 1 --quiet
# 2. hybrid Q+N+P derived from it with L_hyb
$T train --data "$DATA" --out "$WORK/hybrid.pt" --variant hybrid --init "$WORK/float.pt" --steps 80 --lr 5e-4 \
    --batch-size 8 --blur 0.2 --flip 0.5 --threads 1 --quiet
# 2b. baseline: the same float model trained on synthetic sequences only (no real frames)
$T train --out "$WORK/synthetic.pt" --steps 400 --batch-size 8 --threads 1 --quiet
# 3. OTB evaluation of five runs into one result folder (one <tracker>/Crossing.txt each, merged table/plots)
$T evaluate "$DATA" --checkpoint "$WORK/synthetic.pt" --out "$OUT" --threads 1 --quiet
$T evaluate "$DATA" --checkpoint "$WORK/float.pt" --out "$OUT" --threads 1 --quiet
$T evaluate "$DATA" --checkpoint "$WORK/hybrid.pt" --out "$OUT" --threads 1 --quiet
$T evaluate "$DATA" --checkpoint "$WORK/hybrid.pt" --deploy --out "$OUT" --threads 1 --quiet
$T evaluate "$DATA" --checkpoint "$WORK/hybrid.pt" --online --out "$OUT" --threads 1 --quiet
# 4. the overlay GIF and strip of the hybrid + online run
$T track "$DATA" --checkpoint "$WORK/hybrid.pt" --online --overlay --overlay-step 4 --out "$OUT/overlay" --threads 1 --quiet
