#!/bin/bash
# De-focus Mamba decay x RoPE ablation on Fashion-MNIST (README "Stage 1 on Fashion-MNIST"): the nine
# configs/classification/fashion_defocus_mamba_decay-{none,fixed,learnable}_rope-{none,fixed,learnable}.yaml
# at the short budget of the README's Mamba rows (200 steps of 32 images, top-1 on the first 5000 test images).
# Usage: benchmarks/fashion_mamba_ablation.sh [OUT_DIR]   (default runs/fm_ablation)
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/fm_ablation}
mkdir -p "$out"
for decay in none fixed learnable; do
  for rope in none fixed learnable; do
    name="defocus_mamba_decay-${decay}_rope-${rope}"
    start=$(date +%s)
    .venv/bin/defocus-vlm train classification --config "fashion_$name" train.epochs=1 train.max_steps=200 \
      train.batch_size=32 optim.warmup_epochs=0.02 data.limit_val=5000 train.progress=false \
      "train.output_dir=$out/$name" > "$out/$name.log" 2>&1
    echo "$name rc=$? wall=$(( $(date +%s) - start ))s" >> "$out/summary.txt"
  done
done
