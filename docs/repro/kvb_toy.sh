#!/usr/bin/env bash
# The toy reproduction of docs/kvb.md (Figure 2 of the paper): 8 Gaussian classes in 4 stages of
# 2, every model, 5 seeds, the authors' settings (1000 full-batch steps per stage); then a sweep
# over steps per stage and the KV learning rate (docs/repro/kvb_toy_sweep.yaml). About 1.5
# minutes on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/repro-kvb-toy}
narrows kvb toy --seeds 0 1 2 3 4 --no-progress --out "$OUT/toy"
narrows kvb sweep docs/repro/kvb_toy_sweep.yaml --no-progress --out "$OUT/sweep"
