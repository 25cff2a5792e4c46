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

* :class:`~narrows.interactions.options.EstimateOptions`,
  :class:`~narrows.interactions.options.OrderLossOptions` — the options of the commands, with
  their defaults.

The command line is ``narrows interactions run | plot | compare | train``. Names are imported
on first use, so ``narrows.interactions.options`` (what ``--help`` needs) loads without torch.
"""

from narrows.lazy import lazy_package

_WHERE = {
    "estimate_image": "estimator", "planned_forwards": "estimator",
    "upstream_forwards": "estimator",
    "compare_models": "measure", "measure_into": "measure", "settings_from_preset": "measure",
    "RECIPES": "order_loss", "OrderLoss": "order_loss",
    "PlayerGrid": "players", "normalised_baseline": "players",
    "PRESETS": "presets",
    "InteractionResult": "result", "plot_curves": "result",
    "InteractionComparison": "result",
    "reward": "rewards",
    "InteractionSettings": "runner", "multi_order": "runner",
    "UPSTREAM_RATIOS": "sampling", "order_of": "sampling",
    "EstimateOptions": "options", "OrderLossOptions": "options",
}

__all__ = lazy_package(__name__, _WHERE)
