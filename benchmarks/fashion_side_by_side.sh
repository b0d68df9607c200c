#!/bin/bash
# Fashion-MNIST side by side (README "Stage 1 on Fashion-MNIST"): one fixed budget for every preset,
# 1 epoch = 468 steps of 128 images, the recipe of configs/classification/fashion_<preset>.yaml.
# Usage: benchmarks/fashion_side_by_side.sh [PRESET ...]   (default: the six presets of the table)
# Ablation rows: pass defocus_mamba_decay-X_rope-Y names (configs/classification/).
set -u
cd "$(dirname "$0")/.."
presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(vit causal_vit defocus_vit defocus_retnet causal_mamba defocus_mamba)
mkdir -p runs/fm_1ep
for p in "${presets[@]}"; do
  start=$(date +%s)
  .venv/bin/defocus-vlm train classification --config "fashion_$p" train.epochs=1 optim.warmup_epochs=0.1 \
    train.progress=false "train.output_dir=runs/fm_1ep/$p" > "runs/fm_1ep/$p.log" 2>&1
  echo "$p rc=$? wall=$(( $(date +%s) - start ))s" >> runs/fm_1ep/summary.txt
done
