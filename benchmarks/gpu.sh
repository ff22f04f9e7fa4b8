#!/usr/bin/env bash
# The GPU benchmark of issues 25 and 37 (under 5 minutes on an H100/H200, data generation included): DLRM training
# samples/s of every method with its ratio to full, hash and a plain PyTorch loop, host waits per step, peak GPU
# memory, one clustering / reallocation timed apart; full, hash, cafe and cce at 1,000x shared on Kaggle's unscaled
# vocabulary (33.8M ids); the sketch's inserts/s; and the lookup benchmark. Writes benchmarks/results/gpu.{md,json}
# and gpu_lookup.{md,json}. Run from anywhere, with the machine's own CUDA torch (nothing is installed):
#   bash benchmarks/gpu.sh            # DEVICE=cuda:1 picks another GPU; OUT=DIR writes the results there
#   DEVICE=cpu QUICK=1 OUT=/tmp/g bash benchmarks/gpu.sh   # the same script on CPU at quick sizes (its test)
# Every part runs whatever another part did: a row that cannot run says why in the table, and the script's status
# is the worst of its parts.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-benchmarks/results}
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
    DATA=${DATA:-$OUT/.gpu-data}; VOCAB=${VOCAB:-$OUT/.gpu-vocab}
    ROWS=(--train-rows 20000 --eval-rows 1000 --scale 1e-3); VOCAB_ROWS=(--train-rows 20000 --eval-rows 1000 --scale 1e-2)
    STEPS=(--batch-size 512 --compression 10 --warmup 2 --steps 3 --sync-steps 2 --quick); LOOKUP=(--rounds 1 --steps 2 --num-embeddings 10000)
else
    DATA=${DATA:-/tmp/compemb-gpu-data}; VOCAB=${VOCAB:-/tmp/compemb-gpu-vocab}
    ROWS=(--train-rows 400000 --eval-rows 20000 --scale 3e-2); VOCAB_ROWS=(--train-rows 300000 --eval-rows 10000 --scale 1)
    STEPS=(); LOOKUP=(--rounds 3 --steps 20)
fi
# before any work: the imports every part needs, and the device
"$PYTHON" -c "import torch, numpy, safetensors, compemb.train, compemb.bench.syncs, compemb.bench.lookup" \
    || { echo "benchmarks/gpu.sh: an import failed (above): nothing was run" >&2; exit 2; }
if [ "${DEVICE%%:*}" = cuda ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')" || exit 2
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
mkdir -p "$OUT"
status=0
[ -f "$DATA/manifest.json" ] || "$PYTHON" -m compemb synth --out "$DATA" "${ROWS[@]}" --seed 0 || exit 2
[ -f "$VOCAB/manifest.json" ] || "$PYTHON" -m compemb synth --out "$VOCAB" "${VOCAB_ROWS[@]}" --seed 2 || VOCAB=""
"$PYTHON" benchmarks/gpu.py --data "$DATA" ${VOCAB:+--vocab-data "$VOCAB"} --device "$DEVICE" "${STEPS[@]}" \
    --output "$OUT/gpu" || status=$?
# lookups alone: 26 tables of 1M ids at 100x, batch 2,048, forward + backward
"$PYTHON" -m compemb bench lookup --device "$DEVICE" "${LOOKUP[@]}" \
    --methods full hash ce bloom qr hemb robe hashednets cce cafe cafe-ml offline --output "$OUT/gpu_lookup" || status=$?
exit $status
