#!/usr/bin/env bash
# A drifting stream with arriving ids against a stationary one (issue 34 item 2). Resumable (data sets made once,
# finished runs read back).   bash benchmarks/drift.sh [OUT]   (default runs/drift; about 25 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/drift}
COMPEMB=${COMPEMB:-.venv/bin/compemb}
ROWS="--train-rows 300000 --eval-rows 30000 --scale 3e-3 --seed 0"
# make run's model and recipe: one shared table at 100x, Adagrad 0.05, one epoch, the best of 3 validations
RECIPE="--compression 100 --sharing shared --dim 16 --bottom 64 --top 64 --optimizer adagrad --lr 0.05 --table-optimizer adagrad --table-lr 0.05 \
--batch-size 2048 --epochs 1 --evals-per-epoch 3 --seeds 5 --baseline hash"
METHODS=hash,offline,cafe,cafe-ml,mch,ce,robe,cce-hybrid
[ -f "$OUT/data-stationary/manifest.json" ] || $COMPEMB synth --out "$OUT/data-stationary" $ROWS
# every feature's top 1% replaced by the end of the stream, 10% of every feature's ids arriving along it
[ -f "$OUT/data-drift/manifest.json" ] || $COMPEMB synth --out "$OUT/data-drift" $ROWS --drift 1 --new-ids 0.1
for set in stationary drift; do
  $COMPEMB bench quality --data "$OUT/data-$set" --out "$OUT/sweep-$set" --methods $METHODS $RECIPE
done
