#!/usr/bin/env bash
# Planted-premise proofs (issue 34 item 1): each founding method against its natural baseline on a set where its
# premise holds, under two recipes. Resumable: the data sets are made once, finished runs are read back.
#   bash benchmarks/premise.sh [OUT]   (default runs/premise; about 100 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/premise}
COMPEMB=${COMPEMB:-.venv/bin/compemb}
ROWS="--train-rows 1000000 --eval-rows 50000 --scale 1e-3 --seed 0"
MODEL="--sharing shared --dim 16 --bottom 64 --top 64 --batch-size 2048 --seeds 5"
# make run's recipe: Adagrad 0.05, one epoch, the best of 3 validation checkpoints
ADAGRAD="$MODEL --optimizer adagrad --lr 0.05 --table-optimizer adagrad --table-lr 0.05 --epochs 1 --evals-per-epoch 3"
# the README's recipe: Adam 0.001 (tables 0.01), two epochs, the best of 6 validation checkpoints
ADAM="$MODEL --optimizer adam --lr 0.001 --table-optimizer adam --table-lr 0.01 --epochs 2 --evals-per-epoch 3"
[ -f "$OUT/data-hot/manifest.json" ] || $COMPEMB synth --out "$OUT/data-hot" $ROWS --premise hot --hot-ids 8
# the hot set with 4 strong ids a feature: 35 of the 36 in the fields CAFE compresses have more than 1/272 of the
# scored traffic, so its sketch can see them (with 8, 30 of the 72 cannot be told from the churn)
[ -f "$OUT/data-hot4/manifest.json" ] || $COMPEMB synth --out "$OUT/data-hot4" $ROWS --premise hot --hot-ids 4
[ -f "$OUT/data-clusters/manifest.json" ] || $COMPEMB synth --out "$OUT/data-clusters" $ROWS --premise clusters --clusters 4
for recipe in adagrad adam; do
  if [ $recipe = adagrad ]; then R=$ADAGRAD; else R=$ADAM; fi
  # CAFE's premise: 8 hot ids a feature (72 in the 9 fields CAFE compresses) against 339 hashed rows at 100x
  $COMPEMB bench quality --data "$OUT/data-hot" --out "$OUT/hot-$recipe" \
    --methods full,hash,cafe,cafe-ml,cafe:hot_policy=top,cafe-ml:hot_policy=top,offline,mch,ce,robe --baseline hash \
    --compression 100 $R
  # the same with 4 strong ids a feature (hot4): CAFE's sketch can see them
  $COMPEMB bench quality --data "$OUT/data-hot4" --out "$OUT/hot4-$recipe" \
    --methods hash,cafe,cafe:hot_policy=top,offline,ce,robe,cafe-ml,mch --baseline hash --compression 100 $R
  # CCE's premise: 4 clusters a feature (104 in all); cce-paper's k = 170 rows a column at 100x (the paper's
  # accounting: floats only) against ce at the same floats
  $COMPEMB bench quality --data "$OUT/data-clusters" --out "$OUT/clusters-$recipe" \
    --methods full,ce,cce-paper,hash,robe --baseline ce --compression 100 $R
  # honest cce where it can be built (5x) against ce at the same stored bytes
  $COMPEMB bench quality --data "$OUT/data-clusters" --out "$OUT/clusters-honest-$recipe" \
    --methods ce,cce --baseline ce --compression 5 $R
done
