"""The discrete key-value bottleneck and class-incremental learning on frozen embeddings.

* :class:`KeyValueBottleneck`: fixed random heads, per-head codebooks of frozen keys, trained
  values, the voting (default) or parametric decoders, pruning of never-fetched pairs.
* :func:`fit_keys` / :meth:`KeyValueBottleneck.init_keys`: EMA k-means key initialisation with
  Laplace smoothing and dead-code restarts (:class:`KeyInitStats`).
* :func:`train_values`, :func:`cache_indices`: value training by plain SGD from cached fetch
  indices (the same result as training through ``forward``).
"""

from narrows.kvb.keys import KeyInitStats, StepResult, ema_step, fit_keys
from narrows.kvb.layer import DECODERS, SPLITTING_MODES, KeyValueBottleneck, nearest_keys
from narrows.kvb.train import (
    TrainStats,
    cache_indices,
    epoch_order,
    logits_from_cache,
    pruned_indices,
    train_values,
)

__all__ = [
    "DECODERS",
    "SPLITTING_MODES",
    "KeyInitStats",
    "KeyValueBottleneck",
    "StepResult",
    "TrainStats",
    "cache_indices",
    "ema_step",
    "epoch_order",
    "fit_keys",
    "logits_from_cache",
    "nearest_keys",
    "pruned_indices",
    "train_values",
]
