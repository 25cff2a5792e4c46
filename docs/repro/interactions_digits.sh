#!/usr/bin/env bash
# The small-scale reproduction of docs/interactions.md: ResNet-20 on digits, trained normally and
# with the three order-loss recipes, interaction curves (cpu-small) on the same images, pairs and
# contexts, overlaid with the same network at initialisation. About 25 minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/repro-interactions}
COMMON="--data digits --epochs 15 --no-progress"
narrows train $COMMON --out "$OUT/normal"
for recipe in high mid low; do
  narrows interactions train $COMMON --recipe "$recipe" --grid 8 --out "$OUT/$recipe"
done
cat > "$OUT/models.yaml" <<YAML
data: digits
preset: cpu-small
models:
  - normal=$OUT/normal/best.pt
  - init=$OUT/normal/init.pt
  - high=$OUT/high/best.pt
  - mid=$OUT/mid/best.pt
  - low=$OUT/low/best.pt
YAML
narrows interactions compare --config "$OUT/models.yaml" --out "$OUT/curves" --no-progress
for run in normal high mid low; do
  python -c "import json,sys; r=json.load(open('$OUT/$run/results.json')); print('$run', r['final']['top1'])"
done
