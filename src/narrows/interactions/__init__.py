"""Multi-order interactions and the representation bottleneck (Deng et al., ICLR 2022).

* :func:`multi_order` — Δv, I^(m), A and J of a model on images held in memory.
* :class:`InteractionSettings`, :data:`PRESETS` — grid, pairs, contexts, ratios, reward, ...
* :class:`InteractionResult` — the estimates with standard errors, ``save``/``load``/``plot``;
  :func:`plot_curves` overlays several.
* :class:`OrderLoss`, :data:`RECIPES` — training losses that encourage or penalise a band of
  orders.
* :func:`estimate_image` — the estimator on any value function over player masks.
* :func:`measure_into`, :func:`compare_models`, :func:`settings_from_preset` — what
  ``narrows interactions run`` and ``compare`` do: plan, warn, run with resume, save in a run
  directory.

The command line is ``narrows interactions run | plot | compare | train``.
"""

from narrows.interactions.estimator import estimate_image, planned_forwards, upstream_forwards
from narrows.interactions.measure import compare_models, measure_into, settings_from_preset
from narrows.interactions.order_loss import RECIPES, OrderLoss
from narrows.interactions.players import PlayerGrid, normalised_baseline
from narrows.interactions.presets import PRESETS
from narrows.interactions.result import InteractionResult, plot_curves
from narrows.interactions.rewards import reward
from narrows.interactions.runner import InteractionSettings, multi_order
from narrows.interactions.sampling import UPSTREAM_RATIOS, order_of

__all__ = [
    "PRESETS",
    "RECIPES",
    "UPSTREAM_RATIOS",
    "InteractionResult",
    "InteractionSettings",
    "OrderLoss",
    "PlayerGrid",
    "compare_models",
    "estimate_image",
    "measure_into",
    "multi_order",
    "normalised_baseline",
    "order_of",
    "planned_forwards",
    "plot_curves",
    "reward",
    "settings_from_preset",
    "upstream_forwards",
]
