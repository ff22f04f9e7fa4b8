#!/usr/bin/env bash
# CAFE's small-budget default (threshold 30) against the paper's 500, at 10,000x of the Kaggle-shape set, 5 seeds,
# the verdict from bench quality's table (issue 34 item 4: the choice was made on a tie of 3 seeds).
#   bash benchmarks/cafe_default.sh [OUT]   (default runs/kaggle; ~20 minutes on 2 cores; resumable)
set -euo pipefail
OUT=${1:-runs/kaggle}
COMPEMB=${COMPEMB:-.venv/bin/compemb}
[ -f "$OUT/data/manifest.json" ] || $COMPEMB synth --out "$OUT/data" --train-rows 4500000 --eval-rows 200000 --scale 0.1 --seed 0
$COMPEMB bench quality --data "$OUT/data" --out "$OUT/cafe-default" \
  --methods cafe:hash_rate=0.1:threshold=30,cafe:hash_rate=0.1:threshold=500 --baseline cafe:hash_rate=0.1:threshold=30 \
  --compression 10000 --seeds 5 --sharing shared --dim 16 --bottom 256,64 --top 256,64 --optimizer adagrad --lr 0.05 --table-optimizer adagrad --table-lr 0.05 \
  --batch-size 2048 --epochs 1 --evals-per-epoch 6
