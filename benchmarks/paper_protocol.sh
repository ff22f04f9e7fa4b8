#!/usr/bin/env bash
# The papers' own protocol at full Criteo Kaggle cardinalities (issue 34 item 2): 33.8M ids (synth --scale 1), SGD at
# lr 0.1, batch 128, one epoch, DLRM's MLPs (--protocol cafe-paper), each method against the paper's baseline
# (hash-fields: a hashed table per field, small fields full) at CAFE's budgets, 5 seeds.
# Resumable: the data set is made once, finished runs are read back; one budget per call if time is short:
#   bash benchmarks/paper_protocol.sh [OUT] [BUDGETS]   (default runs/paper "10000 1000")
# 2.5-4 minutes a run on 2 cores (3M train rows at 12k-20k samples/s): ~2 hours a budget with every method.
# Measured (benchmarks/results/paper_protocol.md): 10,000x and 1,000x, every method, 5 seeds.
set -euo pipefail
OUT=${1:-runs/paper}
BUDGETS=${2:-"10000 1000"}
COMPEMB=${COMPEMB:-.venv/bin/compemb}
[ -f "$OUT/data/manifest.json" ] || \
  $COMPEMB synth --out "$OUT/data" --train-rows 3000000 --eval-rows 100000 --scale 1 --seed 0
for budget in $BUDGETS; do
  $COMPEMB bench quality --protocol cafe-paper --data "$OUT/data" --out "$OUT/cafe-${budget}x" \
    --methods hash-fields,cafe,cafe:hot_policy=top,hash,ce,robe,cafe-ml,mch --compression "$budget" --seeds 5
done
