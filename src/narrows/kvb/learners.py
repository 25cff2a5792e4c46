"""The models of the protocols as learners: train on a phase's batches, predict the test set.

Both wrappers see the same batches (:meth:`Phase.batches`) and nothing else of the stream:
no task id, no boundary signal; one optimiser for the whole stream.

* :class:`DKVBLearner`: a key-value bottleneck with frozen keys; every sample's fetched pairs are
  searched once (cached), the values train by plain SGD from the cache
  (:func:`narrows.kvb.train.train_values`); the test set is scored with never-fetched pairs
  pruned (a head whose nearest pair was never trained answers with its nearest used pair).
* :class:`BaselineLearner`: any :class:`~narrows.kvb.baselines.Baseline` (inputs encoded once).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from narrows.errors import UserError
from narrows.kvb.baselines import Baseline, FitSettings
from narrows.kvb.protocols import Phase
from narrows.kvb.registry import LEARNERS, MODEL_NAMES

#: Batches handed to ``train_values`` per call (they are cut again into the same batches).
BATCHES_PER_CALL = 64


class BaselineLearner:
    """A baseline trained on the phase's batches with one optimiser for the whole stream."""

    def __init__(self, model: Baseline, train: tuple[Tensor, Tensor], test: Tensor,
                 settings: FitSettings) -> None:
        self.model = model
        self.features = _encode(model, train[0])
        self.labels = train[1]
        self.test = _encode(model, test)
        self.settings = replace(settings, reuse_optimizer=True)

    def train_phase(self, phase: Phase) -> dict[str, Any]:
        log = self.model.fit_encoded(self.features, self.labels, self.settings,
                                     order=phase.order())
        return {"steps": log.steps, "mean_loss": log.mean_loss}

    def predict_test(self) -> Tensor:
        return self.model.predict(self.test, encoded=True)


class DKVBLearner:
    """A key-value bottleneck (keys frozen) whose values train from cached fetch indices."""

    def __init__(self, layer: Any, train: tuple[Tensor, Tensor], test: Tensor, *, lr: float = 0.3,
                 batch_size: int = 256, label_smoothing: float = 0.1, clip: float | None = 1.0,
                 prune: bool = True, cache_batch: int = 1024) -> None:
        from narrows.kvb.train import cache_indices

        if not layer.frozen:
            raise ValueError("the layer's keys must be initialised and frozen first")
        self.layer = layer
        self.indices = cache_indices(layer, train[0], batch_size=cache_batch)
        self.labels = train[1]
        self.test = test
        self.test_indices = cache_indices(layer, test, batch_size=cache_batch)
        self.lr, self.batch_size, self.clip = lr, batch_size, clip
        self.label_smoothing, self.prune = label_smoothing, prune
        self.sparse = not any(p.requires_grad for n, p in layer.named_parameters()
                              if n != "values")

    def train_phase(self, phase: Phase) -> dict[str, Any]:
        steps, loss = 0, 0.0
        group: list[Tensor] = []
        for batch in phase.batches(self.batch_size):
            group.append(batch)
            if len(group) == BATCHES_PER_CALL:
                s, l_ = self._train(torch.cat(group))
                steps, loss, group = steps + s, loss + l_, []
        if group:
            s, l_ = self._train(torch.cat(group))
            steps, loss = steps + s, loss + l_
        used = float((self.layer.usage > 0).float().mean())
        return {"steps": steps, "mean_loss": loss / max(steps, 1), "pairs_used": used}

    def _train(self, visits: Tensor) -> tuple[int, float]:
        from narrows.kvb.train import train_values

        stats = train_values(self.layer, self.indices[visits], self.labels[visits], epochs=1,
                             lr=self.lr, batch_size=self.batch_size,
                             label_smoothing=self.label_smoothing, clip=self.clip,
                             shuffle=False, sparse=self.sparse)
        return stats.steps, stats.loss_per_epoch[0] * stats.steps if stats.steps else 0.0

    def predict_test(self) -> Tensor:
        from narrows.kvb.train import logits_from_cache, pruned_indices

        idx = self.test_indices
        if self.prune:
            idx = pruned_indices(self.layer, idx, self.test)
        return logits_from_cache(self.layer, idx).argmax(dim=1)


def _encode(model: Baseline, inputs: Tensor, chunk: int = 4096) -> Tensor:
    with torch.no_grad():
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        parts = [model.encode(inputs[i:i + chunk].to(device)).cpu()
                 for i in range(0, len(inputs), chunk)]
    return torch.cat(parts) if parts else inputs


#: Model names of the protocols: the key-value bottleneck and the baselines.
MODELS = MODEL_NAMES


def make_learner(name: str, settings: Any, *, train: tuple[Tensor, Tensor], test: Tensor,
                 classes: int, layer: Any = None,
                 device: Any = "cpu") -> tuple[DKVBLearner | BaselineLearner, dict[str, Any]]:
    """The learner of the model ``name`` (one of :data:`narrows.kvb.registry.LEARNERS`) on
    ``train`` = (features, labels) and the ``test`` features of ``classes`` classes, and the
    optimiser settings to record. ``settings``: a :class:`~narrows.kvb.continual.ContinualSettings` (or anything
    with its attributes); ``layer``: the key-value layer with fitted keys (``dkvb`` trains a
    copy of it, ``vq`` quantises with its keys)."""
    import copy

    from narrows.runtime import derive_seed

    s = settings
    clip = s.gradient_clip or None
    if name not in LEARNERS:
        raise UserError(f"unknown model {name!r}", f"use one of: {', '.join(MODEL_NAMES)}")
    if name == "dkvb":
        learner = DKVBLearner(copy.deepcopy(layer), train, test, lr=s.lr,
                              batch_size=s.batch_size, label_smoothing=s.label_smoothing,
                              clip=clip, prune=s.prune)
        return learner, {"lr": s.lr, "optimizer": "sgd"}
    model = make_baseline(name, train[0].shape[1], classes, hidden=s.hidden,
                          ridge_decay=s.ridge_decay, layer=layer, vq_decoder=s.vq_decoder,
                          seed=derive_seed(s.seed, 0xB5))
    model = model.to(device)
    fit = FitSettings(lr=s.probe_lr, batch_size=s.batch_size, optimizer=s.probe_optimizer,
                      label_smoothing=s.label_smoothing, clip=clip, seed=s.seed)
    meta = {"lr": s.probe_lr, "optimizer": s.probe_optimizer,
            "weight_decay": model.weight_decay}
    return BaselineLearner(model, train, test, fit), meta


def make_baseline(name: str, dim: int, classes: int, *, hidden: int = 128,
                  ridge_decay: float = 1e-4, layer: Any = None, vq_decoder: str = "mlp",
                  seed: int = 0) -> Baseline:
    """The baseline called ``name`` (``vq`` quantises with the keys of ``layer``)."""
    from narrows.kvb.baselines import LinearProbe, MLPProbe, VQBottleneck, ridge

    if name == "linear":
        return LinearProbe(dim, classes, seed=seed)
    if name == "lp-no-bias":
        return LinearProbe(dim, classes, bias=False, seed=seed)
    if name == "mlp":
        return MLPProbe(dim, classes, hidden, seed=seed)
    if name == "ridge":
        return ridge("linear", dim, classes, ridge_decay, seed=seed)
    if name == "ridge-mlp":
        return ridge("mlp", dim, classes, ridge_decay, hidden=hidden, seed=seed)
    if name == "vq":
        if layer is None:
            raise UserError("the VQ baseline needs a key-value layer's keys", "pass `layer` with fitted keys")
        return VQBottleneck.from_layer(layer, classes, decoder=vq_decoder,  # type: ignore[arg-type]
                                       hidden=hidden, seed=seed)
    raise UserError(f"unknown baseline {name!r}", f"use one of {MODELS[1:]}")
