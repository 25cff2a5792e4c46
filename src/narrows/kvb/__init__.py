"""The discrete key-value bottleneck and class-incremental learning on frozen embeddings.

* :class:`KeyValueBottleneck`: fixed random heads, per-head codebooks of frozen keys, trained
  values, the voting (default) or parametric decoders, pruning of never-fetched pairs.
* :func:`fit_keys` / :meth:`KeyValueBottleneck.init_keys`: EMA k-means key initialisation with
  Laplace smoothing and dead-code restarts (:class:`KeyInitStats`).
* :func:`train_values`, :func:`cache_indices`: value training by plain SGD from cached fetch
  indices (the same result as training through ``forward``).
* :func:`embed`: a frozen backbone's embeddings of a data set, one file per split.
* :func:`train_continual`: the class-incremental protocols on stored embeddings, every model of
  :data:`LEARNERS` (:class:`ContinualRun`); :func:`find_embeddings` /
  :func:`choose_embeddings`: what an embeddings directory holds.
* :func:`run_toy`: the 2-D toy experiment of Figure 2 (:class:`ToyRun`).

Names are imported on first use, so ``narrows.kvb.registry`` (the model names the command line
offers) loads without torch.
"""

from __future__ import annotations

from narrows.lazy import lazy_package

_WHERE = {
    "KeyInitStats": "keys", "StepResult": "keys", "ema_step": "keys", "fit_keys": "keys",
    "DECODERS": "layer", "SPLITTING_MODES": "layer", "KeyValueBottleneck": "layer",
    "nearest_keys": "layer",
    "TrainStats": "train", "cache_indices": "train", "epoch_order": "train",
    "logits_from_cache": "train", "pruned_indices": "train", "train_values": "train",
    "LEARNERS": "registry", "MODEL_NAMES": "registry", "TOY_MODELS": "registry",
    "make_learner": "learners",
    "find_embeddings": "embeddings", "choose_embeddings": "embeddings", "embed": "store",
    "ContinualSettings": "continual", "ContinualRun": "continual",
    "ContinualTask": "continual", "load_task": "continual", "fit_key_layer": "continual",
    "resolve_settings": "continual", "train_continual": "continual",
    "ToySettings": "toy_run", "ToyRun": "toy_run", "run_toy": "toy_run",
}

__all__ = lazy_package(__name__, _WHERE)
