#!/usr/bin/env bash
# Trains the small model that ships inside the package (llama2c/models/) with this
# project's own tools, from the TinyStories text in ../shared/data (CDLA-Sharing-1.0;
# see docs/BUNDLED_MODEL.md for the figures of the shipped run).
#
#   bash scripts/bundled_model.sh            # full recipe (about 45 minutes on 2 cores)
#   ITERS=50 bash scripts/bundled_model.sh   # a quick smoke run
set -euo pipefail
export PYTHONFAULTHANDLER=1   # a crash prints the Python stack (see docs/BUNDLED_MODEL.md)
cd "$(dirname "$0")/.."
TEXT=${TEXT:-../shared/data/tinystories/TinyStories-validation-head.txt}
WORK=${WORK:-build/bundled}
ITERS=${ITERS:-800}
mkdir -p "$WORK" llama2c/models

# --force / --overwrite: a rerun replaces the previous run's files (the tools refuse otherwise)
python -m llama2c tokenizer train "$TEXT" --vocab-size 512 -o "$WORK/tok512.model" --force
python -m llama2c tokenizer export "$WORK/tok512.model" -o "$WORK/tok512.bin" --force
python -m llama2c data prepare "$TEXT" --tokenizer "$WORK/tok512.model" -o "$WORK/data"
python -m llama2c train --data="$WORK/data" --out_dir="$WORK/out" --overwrite \
  --dim=128 --n_layers=6 --n_heads=8 --n_kv_heads=4 --max_seq_len=256 \
  --batch_size=16 --gradient_accumulation_steps=1 --dropout=0.1 \
  --learning_rate=2e-3 --warmup_iters=50 --min_lr=1e-4 --max_iters="$ITERS" \
  --eval_interval=100 --eval_iters=10 --log_interval=20 --dtype=float32 --export_version=-1
# int8 keeps the package small; the best checkpoint (lowest validation loss) is exported
python -m llama2c export llama2c/models/model.bin --version 2 --checkpoint "$WORK/out/ckpt.pt" --force
cp "$WORK/tok512.bin" llama2c/models/tokenizer.bin
python -m llama2c info llama2c/models/model.bin
python -m llama2c generate "Once upon a time" --seed 1 --steps 200
