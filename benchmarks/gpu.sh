#!/usr/bin/env bash
# The GPU benchmark of issue 25 (under 5 minutes on an H100/H200, data generation included): DLRM training
# samples/s of every method with its ratio to full and to hash, host syncs per step, peak GPU memory; full, hash,
# cafe and cce at 1,000x shared on Kaggle's unscaled vocabulary (33.8M ids); the sketch's inserts/s; and the
# lookup benchmark. Writes benchmarks/results/gpu.{md,json} and gpu_lookup.{md,json}. Run from anywhere, with the
# machine's own CUDA torch (nothing is installed):
#   bash benchmarks/gpu.sh            # DEVICE=cuda:1 picks another GPU; OUT=DIR writes the results there
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
DATA=${DATA:-/tmp/compemb-gpu-data}
VOCAB=${VOCAB:-/tmp/compemb-gpu-vocab}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
mkdir -p "$OUT"
[ -f "$DATA/manifest.json" ] || "$PYTHON" -m compemb synth --out "$DATA" --train-rows 400000 --eval-rows 20000 \
    --scale 3e-2 --seed 0
[ -f "$VOCAB/manifest.json" ] || "$PYTHON" -m compemb synth --out "$VOCAB" --train-rows 300000 --eval-rows 10000 \
    --scale 1 --seed 2
"$PYTHON" benchmarks/gpu.py --data "$DATA" --vocab-data "$VOCAB" --device "$DEVICE" --output "$OUT/gpu"
# lookups alone: 26 tables of 1M ids at 100x, batch 2,048, forward + backward
"$PYTHON" -m compemb bench lookup --device "$DEVICE" --rounds 3 --steps 20 \
    --methods full hash ce bloom qr hemb robe hashednets cce cafe cafe-ml offline --output "$OUT/gpu_lookup"
