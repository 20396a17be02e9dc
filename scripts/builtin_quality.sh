#!/usr/bin/env bash
# The built-in models' quality, measured as issue 5 asks: standard classification on all of Fashion-MNIST
# (60 000 train / 10 000 test; every token at cls and avg; C chosen on a held-out 10 %) and standard
# segmentation on the Fashion-MNIST Scenes (patch tokens, mIoU), last block, hyperplane and cosine rules.
# Run it after replacing the weights (scripts/pretrain_builtin_gpu.sh); it ends with the best token per
# model × task × rule and the issue's two DINO targets.
#
#   scripts/builtin_quality.sh [OUT]
#   env: MODELS ("fmnist-dino-vit-tiny fmnist-mae-vit-tiny"), DEVICE (cpu), BATCH (256),
#        SCENES (fashion-mnist-scenes = 10 000 / 2 000 scenes; e.g. "fashion-mnist-scenes?train=500&test=100"),
#        QKVPROBE (qkvprobe), PYTHON (python3)
#
# Feature stores are resumable: an interrupted run picks up where it stopped. Rows go to OUT/results.csv and
# `qkvprobe report OUT` renders them.
set -euo pipefail
out=${1:-runs/builtin-quality}
models=${MODELS:-fmnist-dino-vit-tiny fmnist-mae-vit-tiny}
device=${DEVICE:-cpu}
batch=${BATCH:-256}
scenes=${SCENES:-fashion-mnist-scenes}
q=${QKVPROBE:-qkvprobe}
py=${PYTHON:-python3}
tokens=q,k,v,ffn,ffn_norm
mkdir -p "$out"

for m in $models; do
  for split in train test; do
    "$q" extract --model "builtin:$m" --data fashion-mnist --split "$split" --tokens "$tokens" --positions cls,avg \
      --batch-size "$batch" --device "$device" --no-progress --out "$out/$m/fashion-mnist/$split"
    "$q" extract --model "builtin:$m" --data "$scenes" --split "$split" --tokens "$tokens" --positions patch \
      --batch-size "$batch" --device "$device" --no-progress --out "$out/$m/scenes/$split"
  done
  "$q" evaluate --store "$out/$m/fashion-mnist" --task classification --setting standard --rules hyperplane,cosine \
    --tokens "$tokens" --positions cls,avg --device "$device" --no-progress --out "$out/results.csv"
  "$q" evaluate --store "$out/$m/scenes" --task segmentation --setting standard --rules hyperplane,cosine \
    --tokens "$tokens" --device "$device" --no-progress --out "$out/results.csv"
done

"$py" - "$out/results.csv" <<'EOF'
import sys

from qkvprobe.results import read_results

rows = [r for r in read_results(sys.argv[1]) if r.metric in ("accuracy", "miou")]
best = {}
for r in rows:
    key = (r.model, r.task, r.rule)
    if key not in best or r.value > best[key].value:
        best[key] = r
print(f"{'model':<32} {'task':<15} {'rule':<11} {'best token':<14} value")
for (model, task, rule), r in sorted(best.items()):
    print(f"{model:<32} {task:<15} {rule:<11} {r.token + '·' + r.position:<14} {r.value:.4f}")
targets = {"hyperplane": 0.88, "cosine": 0.75}  # issue 5: the DINO model on Fashion-MNIST test
for (model, task, rule), r in sorted(best.items()):
    if "dino" in model and task == "classification":
        verdict = "met" if r.value >= targets[rule] else "not met"
        print(f"target {rule} >= {targets[rule]}: {r.value:.4f} ({verdict})")
EOF
