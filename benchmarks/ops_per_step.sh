#!/usr/bin/env bash
# Ops dispatched per training step (each would be a kernel launch on a GPU: views and allocations left out), per
# feature and shared, on the device code path on CPU (`compemb bench syncs`, kernels="torch"), at issue 37's
# settings: DLRM dim 16, bottom 256-64, top 256-64, Adam 1e-3 for MLPs and tables, batch 4,096, 100x.
# Prints the two tables; benchmarks/results/ops_per_step.md records them before and after issue 37's changes.
#   bash benchmarks/ops_per_step.sh [DATA]     # DATA: made once (compemb synth --train-rows 100000 --scale 3e-2)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${1:-runs/ops/d}
[ -f "$DATA/manifest.json" ] || "$PYTHON" -m compemb synth --out "$DATA" --train-rows 100000 --eval-rows 5000 \
    --scale 3e-2 --seed 0
METHODS=full,hash,qr,ce,robe,offline,cafe,cafe-ml,cce,cce-paper,cce-hybrid
for sharing in per_feature shared; do
    echo "## $sharing"
    "$PYTHON" -m compemb bench syncs --data "$DATA" --methods "$METHODS" --compression 100 --dim 16 --bottom 256,64 \
        --top 256,64 --optimizer adam --lr 0.001 --table-optimizer adam --table-lr 0.001 --batch-size 4096 \
        --warmup 2 --steps 3 --sharing "$sharing" | grep "^|" | cut -d'|' -f2,6
done
