#!/usr/bin/env bash
# The lookup, DLRM training and HotSketch benchmarks on CUDA; writes benchmarks/results/gpu_lookup.{md,json},
# gpu_train.{md,json} and hotsketch_torch_cuda.{md,json} (under 10 minutes on an H100/H200). Run from the
# repository root on a machine with a GPU:
#   bash benchmarks/gpu.sh            # builds .venv when missing; DEVICE=cuda:1 picks another GPU
# The CUDA build of torch is the machine's own: set PYTHON to an interpreter that has it (default: python3),
# compemb is installed into it in editable mode when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')"
"$PYTHON" -c "import compemb" 2>/dev/null || "$PYTHON" -m pip install --quiet --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
DATA=${DATA:-/tmp/compemb-gpu-data}
[ -f "$DATA/manifest.json" ] || "$PYTHON" -m compemb synth --out "$DATA" --train-rows 400000 --eval-rows 20000 \
    --scale 3e-2 --seed 0
# lookups: 26 tables of 1M ids at 100x, batch 2,048 (as the CPU table), every method the GPU path supports
"$PYTHON" -m compemb bench lookup --device "$DEVICE" --rounds 5 --steps 20 \
    --methods full hash ce bloom qr hemb robe hashednets cce cafe cafe-ml --output "$OUT/gpu_lookup"
# DLRM training (the issue's model: dim 16, bottom 256-64, top 256-64, Adam 1e-3, batch 2,048) against hash
"$PYTHON" -m compemb bench train --device "$DEVICE" --data "$DATA" --methods full,ce,qr,bloom,cce,cafe,cafe-ml \
    --baseline hash --optimizer adam --lr 0.001 --bottom 256,64 --top 256,64 --batch-size 2048 --rounds 5 \
    --steps 50 --out /tmp/compemb-gpu-runs --output "$OUT/gpu_train"
# the sketch alone: its torch ops on the device (the CPU table, benchmarks/results/hotsketch.md, is the compiled one)
"$PYTHON" benchmarks/hotsketch.py --backend torch --device "$DEVICE" --output "$OUT/hotsketch_torch_cuda"
