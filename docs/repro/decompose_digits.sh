#!/usr/bin/env bash
# The digits reproduction of docs/decompose.md: ResNet-20 on scikit-learn's digits (3×32×32),
# influential-channel extraction, decomposed accuracy vs k for histogram, random and top-|W|
# indices, fine-tuning of the k = 5 decomposed network, the essential-features test with the
# random control, pairwise MI, and the CSG baseline. About 10 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/repro-decompose}
COMMON="--no-progress --device ${DEVICE:-cpu}"
STD="$OUT/train/best.pt"
narrows train --model resnet20_cifar --data digits --epochs 15 $COMMON --out "$OUT/train"
for k in 5 10 20; do
  narrows decompose extract --checkpoint "$STD" --k $k $COMMON --out "$OUT/extract-k$k"
done
narrows decompose validate --checkpoint "$STD" --extraction "$OUT/extract-k5" \
  --baselines random top-weights $COMMON --out "$OUT/validate"
narrows decompose finetune --checkpoint "$STD" --indices "$OUT/extract-k5/indices.json" \
  --epochs 2 $COMMON --out "$OUT/finetune"
narrows decompose csg-train --checkpoint "$STD" --epochs 4 --lr 0.01 --period 2 --lam-l1 0.05 \
  --target-density 0.1 --clip clamp $COMMON --out "$OUT/csg"
narrows decompose essential --checkpoint "$STD" --indices "$OUT/extract-k5/indices.json" \
  --csg-checkpoint "$OUT/csg/csg.pt" --csg-order both --sigma 0.5 1 2 $COMMON \
  --out "$OUT/essential"
narrows decompose mutual-info --checkpoint "$STD" --indices "$OUT/extract-k5/indices.json" \
  "$OUT/extract-k10/indices.json" "$OUT/extract-k20/indices.json" \
  --csg-checkpoint "$OUT/csg/csg.pt" --csg-order both --mis $COMMON --out "$OUT/mutual-info"
