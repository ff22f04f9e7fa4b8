#!/usr/bin/env bash
# Planted-premise proofs (issue 34 item 1): each founding method against its natural baseline on a set where its
# premise holds. Resumable: the data sets are made once, finished runs are read back.
#   bash benchmarks/premise.sh [OUT]   (default runs/premise; about 40 minutes on 2 cores)
set -euo pipefail
OUT=${1:-runs/premise}
COMPEMB=${COMPEMB:-.venv/bin/compemb}
ROWS="--train-rows 1000000 --eval-rows 50000 --scale 1e-3 --seed 0"
# the README's recipe (Adam, tables at 0.01), two epochs: the full table gets within ~9% of the Bayes BCE
RECIPE="--sharing shared --dim 16 --bottom 64 --top 64 --optimizer adam --lr 0.001 --table-optimizer adam \
--table-lr 0.01 --batch-size 2048 --epochs 2 --evals-per-epoch 3 --seeds 5"
[ -f "$OUT/data-hot/manifest.json" ] || $COMPEMB synth --out "$OUT/data-hot" $ROWS --premise hot --hot-ids 8
[ -f "$OUT/data-clusters/manifest.json" ] || $COMPEMB synth --out "$OUT/data-clusters" $ROWS --premise clusters --clusters 4
# CAFE's premise: 8 hot ids a feature (~200 in all) against 339 hashed rows at 100x
$COMPEMB bench quality --data "$OUT/data-hot" --out "$OUT/hot" --methods full,hash,cafe,cafe-ml,offline,ce,robe \
  --baseline hash --compression 100 $RECIPE
# CCE's premise: 4 clusters a feature (104 in all); cce-paper's k = 170 rows a column at 100x (the paper's
# accounting: floats only); honest cce where it can be built (5x) against ce there
$COMPEMB bench quality --data "$OUT/data-clusters" --out "$OUT/clusters" --methods full,ce,cce-paper,hash,robe \
  --baseline ce --compression 100 $RECIPE
$COMPEMB bench quality --data "$OUT/data-clusters" --out "$OUT/clusters-honest" --methods ce,cce \
  --baseline ce --compression 5 $RECIPE
