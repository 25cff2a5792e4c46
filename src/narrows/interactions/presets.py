"""Named settings of the estimator (spec §5.3)."""

from __future__ import annotations

from narrows.interactions.sampling import UPSTREAM_RATIOS

SMOKE_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)

PRESETS: dict[str, dict] = {
    # the official CIFAR-10 protocol: ≤ 50 correct train images, 1.04 M forwards each upstream
    "paper-cifar": {"grid": 16, "pairs": 200, "contexts": 100, "ratios": list(UPSTREAM_RATIOS),
                    "images": 50},
    # the timm fork's ImageNet protocol at 224×224 with 16-pixel patches
    "fork-imagenet": {"grid": 14, "pairs": 50, "contexts": 50, "ratios": list(UPSTREAM_RATIOS),
                      "images": 500},
    # minutes on a 2-core CPU; K ≥ 16 keeps the |mean| noise floor moderate (spec §8 A3)
    "cpu-small": {"grid": 8, "pairs": 20, "contexts": 20, "ratios": list(UPSTREAM_RATIOS),
                  "images": 10},
    # plumbing only: the values mean nothing
    "smoke": {"grid": 4, "pairs": 4, "contexts": 4, "ratios": list(SMOKE_RATIOS), "images": 2},
}
