#!/usr/bin/env bash
# Re-train both built-in models (DINO and MAE, vit-tiny-p4 on Fashion-MNIST + scene crops) on one CUDA GPU.
# One run after the other: run side by side on an H200 (2026-11-26) the two processes starved each other's
# CPU-side work, and DINO ran at ~2.5k img/s instead of ~13k alone. The time budgets keep the job inside a
# fixed slot; the lr / weight-decay / EMA schedules follow the wall-clock, so they complete anyway.
#
# Batch 2048: at batch 512 the tiny ViT's step is bound by per-kernel overhead, not arithmetic (~40 ms per step
# for an estimated ~0.7 TFLOP, a few % of the GPU's bf16 peak), so a larger batch buys images per
# second. Measured on an H200 (21-s runs, mean img/s incl. start-up): batch 1024 13.5k, 2048 23.8k, 4096 26.2k,
# 8192 27.3k (the 6.3-min run at 2048: 25.9k; ~12.8k at 512): 2048 is the knee, beyond it fewer steps for
# little gain; the peak lr is set by hand (2e-3, the square-root scaling of DINO's 5e-4 per 256 from batch
# 512's 1e-3) instead of the linear rule. MAE stays at batch 512: at 2048 a 1.5-min run took too few steps
# (513; quick-check accuracy 0.74 against 0.82 for 1 586 steps at 512). Those measurements were of the 128-d
# vit-nano-p4; the shipped 192-d vit-tiny-p4 models (2026-11-27, H200, each alone) ran at 22.0k img/s (DINO,
# batch 2048, 7.9 min, 176 epochs) and 16.3k img/s (MAE, batch 512, 3.2 min, 52 epochs).
#
#   scripts/pretrain_builtin_gpu.sh [OUT_ROOT]
#   env: DINO_MIN (7.9), MAE_MIN (3.2) (0 skips that model), DEVICE (cuda), BATCH (2048, DINO), MAE_BATCH (512), DINO_LR (2e-3),
#        EPOCHS (1000), ARCH (vit-tiny-p4; the models are named fmnist-{dino,mae}-<ARCH without -p4>),
#        DATA_ROOT (folder with the Fashion-MNIST *-ubyte.gz files; default: the Debian package's), PYTHON
#
# Then copy OUT_ROOT/<name>/{model.safetensors,card.json,card.md,loss.png} over
# src/qkvprobe/backbones/builtin/<name>.{safetensors,json,md} and <name>_loss.png, and re-measure with
# scripts/builtin_quality.sh.
set -euo pipefail
out=${1:-runs}
dino_min=${DINO_MIN:-7.9}
mae_min=${MAE_MIN:-3.2}
device=${DEVICE:-cuda}
batch=${BATCH:-2048}
mae_batch=${MAE_BATCH:-512}
dino_lr=${DINO_LR:-2e-3}
epochs=${EPOCHS:-1000}
arch=${ARCH:-vit-tiny-p4}
short=${arch%-p4}
data=(--data fashion-mnist+scenes)
[[ -n ${DATA_ROOT:-} ]] && data+=(--data-root "$DATA_ROOT")
amp=()
[[ $device == cuda* ]] && amp=(--amp bf16)
py=${PYTHON:-python3}
mkdir -p "$out"

if [[ $dino_min != 0 ]]; then  # a budget of 0 minutes skips a model (e.g. DINO_MIN=9 MAE_MIN=0: DINO alone)
"$py" -m qkvprobe pretrain --objective dino "${data[@]}" --arch "$arch" --epochs "$epochs" \
  --batch-size "$batch" --lr "$dino_lr" --num-local-crops 6 --seed 0 --device "$device" "${amp[@]}" \
  --time-budget-min "$dino_min" --name "fmnist-dino-$short" --out "$out/fmnist-dino-$short" \
  >"$out/dino.log" 2>&1 || { tail -n 20 "$out/dino.log"; exit 1; }
tail -n 2 "$out/dino.log"
fi
if [[ $mae_min != 0 ]]; then
"$py" -m qkvprobe pretrain --objective mae "${data[@]}" --arch "$arch" --epochs "$epochs" \
  --batch-size "$mae_batch" --seed 0 --device "$device" "${amp[@]}" --time-budget-min "$mae_min" \
  --name "fmnist-mae-$short" --out "$out/fmnist-mae-$short" >"$out/mae.log" 2>&1 || { tail -n 20 "$out/mae.log"; exit 1; }
tail -n 2 "$out/mae.log"
fi
