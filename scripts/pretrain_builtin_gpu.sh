#!/usr/bin/env bash
# Re-train both built-in models (DINO and MAE, vit-nano-p4 on Fashion-MNIST + scene crops) on one CUDA GPU.
# One run after the other: run side by side on an H200 (2026-11-26) the two processes starved each other's
# CPU-side work, and DINO ran at ~2.5k img/s instead of ~13k alone. The time budgets keep the job inside a
# fixed slot; the lr / weight-decay / EMA schedules follow the wall-clock, so they complete anyway.
#
#   scripts/pretrain_builtin_gpu.sh [OUT_ROOT]      (default runs/; env: DINO_MIN, MAE_MIN, DEVICE, BATCH)
#
# Then copy OUT_ROOT/<name>/{model.safetensors,card.json,card.md,loss.png} over
# src/qkvprobe/backbones/builtin/<name>.{safetensors,json,md} and <name>_loss.png, and run the quality check
# written in the card.
set -euo pipefail
out=${1:-runs}
dino_min=${DINO_MIN:-6.5}
mae_min=${MAE_MIN:-2.5}
device=${DEVICE:-cuda}
batch=${BATCH:-512}
amp=()
[[ $device == cuda* ]] && amp=(--amp bf16)
py=${PYTHON:-python3}
mkdir -p "$out"

"$py" -m qkvprobe pretrain --objective dino --data fashion-mnist+scenes --arch vit-nano-p4 --epochs 300 \
  --batch-size "$batch" --num-local-crops 6 --seed 0 --device "$device" "${amp[@]}" --time-budget-min "$dino_min" \
  --name fmnist-dino-vit-nano --out "$out/fmnist-dino-vit-nano" >"$out/dino.log" 2>&1 || { tail -n 20 "$out/dino.log"; exit 1; }
tail -n 2 "$out/dino.log"
"$py" -m qkvprobe pretrain --objective mae --data fashion-mnist+scenes --arch vit-nano-p4 --epochs 800 \
  --batch-size "$batch" --seed 0 --device "$device" "${amp[@]}" --time-budget-min "$mae_min" \
  --name fmnist-mae-vit-nano --out "$out/fmnist-mae-vit-nano" >"$out/mae.log" 2>&1 || { tail -n 20 "$out/mae.log"; exit 1; }
tail -n 2 "$out/mae.log"
