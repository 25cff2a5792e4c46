#!/usr/bin/env bash
# The class-incremental digits table of docs/kvb.md: ResNet-20 trained on digits (and the same
# network at initialisation), frozen; embeddings of the train and test splits; DKVB against
# linear probe, MLP, ridge and VQ baselines, class-incremental (5 tasks of 2 classes) and i.i.d.
# with the same sample visits; seeds 0, 1, 2. About 6 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/repro-kvb-digits}
COMMON="--no-progress --device ${DEVICE:-cpu}"
narrows train --model resnet20_cifar --data digits --epochs 15 $COMMON --out "$OUT/backbone"
narrows kvb embed --checkpoint "$OUT/backbone/best.pt" --data digits --split train test $COMMON \
  --out "$OUT/embeddings-trained"
narrows kvb embed --model resnet20_cifar --data digits --split train test $COMMON \
  --out "$OUT/embeddings-init"
for seed in 0 1 2; do
  for backbone in trained init; do
    narrows kvb train --embeddings "$OUT/embeddings-$backbone" --data digits --epochs 50 \
      --batch-size 32 --num-books 128 --num-pairs 512 --dim-key 8 --probe-optimizer adam \
      --model dkvb linear mlp ridge vq --seed "$seed" $COMMON --out "$OUT/$backbone-seed$seed"
  done
done
