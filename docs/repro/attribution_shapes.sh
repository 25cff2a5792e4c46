#!/usr/bin/env bash
# The small-scale evaluation of docs/attribution.md: ResNet-20 trained on 64×64 shapes whose
# objects are small (circumradius 10–20 % of the image), then IBA (per-sample and readout) against
# Captum baselines on 200 test images: degradation (8×8 tiles), bounding boxes, sensitivity-n;
# the randomisation sanity check; heatmaps and GIFs. --select first: the first test images, as
# when the tables were made (shapes cycles through its classes, so they are spread already).
# DEVICE=cuda: about 6 minutes on one GPU;
# DEVICE=cpu: about 2 hours on 2 cores (most of it training and sensitivity-n).
set -euo pipefail
OUT=${OUT:-runs/repro-attribution}
DEVICE=${DEVICE:-cpu}
DATA="shapes:classes=4,size=64,train=10000,test=1000,rmin=10,rmax=20"
COMMON="--device $DEVICE --no-progress"
CKPT="$OUT/train/best.pt"
narrows train --model resnet20_cifar --data "$DATA" --epochs 15 $COMMON --out "$OUT/train"
narrows attribution stats --checkpoint "$CKPT" --n-samples 10000 $COMMON --out "$OUT/stats"
STATS="$OUT/stats/statistics.pt"
narrows attribution readout-train --checkpoint "$CKPT" --epochs 5 --beta 1 --lr 1e-3 $COMMON \
  --out "$OUT/readout"
narrows attribution evaluate --checkpoint "$CKPT" --statistics "$STATS" \
  --readout "$OUT/readout/readout.pt" \
  --methods iba,readout,saliency,input_x_gradient,ig,smoothgrad,gradcam,occlusion_8,random \
  --metrics degradation,bbox,sensitivity-n --images 200 --select first $COMMON --out "$OUT/evaluate"
narrows attribution sanity --checkpoint "$CKPT" --statistics "$STATS" \
  --methods iba,saliency,gradcam --images 16 --select first $COMMON --out "$OUT/sanity"
narrows attribution explain --checkpoint "$CKPT" --statistics "$STATS" --images 8 --select first --gif \
  $COMMON --out "$OUT/explain"
# the per-n sensitivity figure of the docs (50 images, 30 sets per n; about 15 minutes on CPU)
narrows attribution evaluate --checkpoint "$CKPT" --statistics "$STATS" \
  --methods iba,occlusion_8,saliency,random --metrics sensitivity-n --n-sets 30 --images 50 --select first \
  $COMMON --out "$OUT/sensitivity"
