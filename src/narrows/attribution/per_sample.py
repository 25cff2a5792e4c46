"""Per-sample IBA (spec §3): optimise one α per image so that the noisy layer still predicts.

Cost: the part of the model before the layer runs once per image, on that one image and
without an autograd graph (:class:`~narrows.attribution.layers.PrefixReplay` records it and
replays its outputs at every step). Each optimisation step then feeds the model the single
image; the hook expands the layer's output R from 1 to the noise batch B and applies the
bottleneck, so only the part after the layer runs, on B samples with gradients. This is valid
because the weights are frozen and the model is in eval mode (nothing before the layer is
random or mixes samples).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from narrows.attribution.bottleneck import Bottleneck
from narrows.attribution.heatmap import AttributionResult, heatmap_from_capacity
from narrows.attribution.layers import PrefixReplay, default_layer, get_layer
from narrows.attribution.statistics import FeatureStatistics, Kind, estimate_statistics
from narrows.errors import UserError

Target = int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


class IBA:
    """Per-sample Information Bottleneck Attribution on ``model`` at ``layer``.

    ``layer=None`` picks :func:`default_layer`. ``statistics`` must describe that layer at the
    input resolution used (see :meth:`estimate`). With ``seed`` set, each image's noise comes
    from its own generator seeded from ``(seed, image id)`` (see :meth:`attribute`), so a heatmap
    does not depend on which images were explained before it; ``None`` uses the global RNG.
    ``normalizer`` (or ``mean``/``std``) makes :meth:`attribute` and :meth:`estimate` take
    [0, 1] images (see :mod:`narrows.attribution.inputs`); without it they take model inputs.
    ``beta``, ``steps``, ``batch_size`` (noise samples per step), ``lr``, ``alpha_init`` and
    ``sigma`` are the optimisation's; ``final_eval`` adds one forward after the last step to
    read the capacity of the final α; ``record_steps`` keeps every step's heatmap; ``relu``
    (default: the statistics' kind) clamps the bottleneck's output at ≥ 0.
    :meth:`attribute` returns an :class:`AttributionResult`.
    """

    def __init__(self, model: nn.Module, layer: str | None = None,
                 statistics: FeatureStatistics | None = None, *, beta: float = 10.0,
                 steps: int = 10, batch_size: int = 10, lr: float = 1.0,
                 alpha_init: float = 5.0, sigma: float = 1.0, final_eval: bool = False,
                 record_steps: bool = False, relu: bool | None = None,
                 seed: int | None = None, normalizer: Any = None, mean: Any = None,
                 std: Any = None) -> None:
        from narrows.attribution.inputs import as_normalizer

        if steps < 1 or batch_size < 1:
            raise UserError(f"steps={steps} and batch_size={batch_size} must be ≥ 1",
                            "use the defaults steps=10, batch_size=10")
        self.model = model
        self.layer = layer if layer is not None else default_layer(model)
        get_layer(model, self.layer)  # fail early on a bad name
        self.statistics = statistics
        self.beta, self.steps, self.batch_size, self.lr = float(beta), steps, batch_size, lr
        self.alpha_init, self.sigma, self.final_eval = alpha_init, sigma, final_eval
        self.record_steps, self.relu = record_steps, relu
        self.seed = seed
        self.normalizer = as_normalizer(normalizer, mean, std)

    def estimate(self, batches: Iterable[Any], n_samples: int = 10_000,
                 kind: Kind = "welford", device: str | torch.device | None = None) -> FeatureStatistics:
        """Estimate, keep and return the statistics of ``self.layer`` on ``batches`` (as
        :func:`~narrows.attribution.statistics.estimate_statistics` takes them)."""
        self.statistics = estimate_statistics(self.model, self.layer, batches, n_samples,
                                              device=device, kind=kind,
                                              normalizer=self.normalizer)
        return self.statistics

    def _bottleneck(self, device: torch.device) -> Bottleneck:
        stats = self.statistics
        if stats is None:
            raise UserError("IBA needs feature statistics of its layer",
                            "call IBA.estimate(batches) or pass statistics=FeatureStatistics.load(...)")
        if stats.layer and stats.layer != self.layer:
            raise UserError(f"the statistics are of layer '{stats.layer}', not '{self.layer}'",
                            "estimate statistics at the layer being explained")
        return Bottleneck.from_statistics(stats, alpha_init=self.alpha_init, sigma=self.sigma,
                                          relu=self.relu).to(device)

    def attribute(self, inputs: torch.Tensor, target: Target,
                  ids: Sequence[int] | None = None) -> AttributionResult:
        """Heatmaps (bits per input pixel) for 1 image (C, H, W) or N images (N, C, H, W).

        ``target``: a class index for all images, a tensor with one class per image, or a
        callable ``target(logits) -> scalar loss`` used instead of the cross-entropy.
        ``ids``: one id per image (e.g. its dataset index) keying its noise when ``seed`` is set
        [default: the position in ``inputs``].
        """
        from narrows.attribution.inputs import model_inputs

        x = model_inputs(as_batch(inputs), self.normalizer)
        targets = per_image_targets(target, x.shape[0])
        ids = list(range(x.shape[0])) if ids is None else [int(i) for i in ids]
        if len(ids) != x.shape[0]:
            raise UserError(f"{len(ids)} image ids for {x.shape[0]} images", "give one id per image")
        device = x.device
        bottleneck = self._bottleneck(device)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        heatmaps, caps, step_maps, seconds = [], [], [], []
        with frozen(self.model), bottleneck.attached(self.model, self.layer):
            for i in range(x.shape[0]):
                start = time.perf_counter()
                bottleneck.generator = self._generator(ids[i], device)
                cap, history = self._fit_one(bottleneck, x[i : i + 1], targets[i])
                seconds.append(time.perf_counter() - start)
                caps.append(cap)
                heatmaps.append(heatmap_from_capacity(cap, size).numpy())
                if self.record_steps:
                    step_maps.append(np.stack([heatmap_from_capacity(c, size).numpy()
                                               for c in history]))
        meta = self._meta(seconds, tuple(caps[0].shape))
        return AttributionResult(
            heatmaps=np.stack(heatmaps),
            targets=None if callable(target) else [int(t) for t in targets],
            capacity=torch.stack(caps).numpy(),
            step_heatmaps=np.stack(step_maps) if self.record_steps else None,
            meta=meta,
        )

    def _generator(self, image_id: int, device: torch.device) -> torch.Generator | None:
        """A generator seeded from (seed, image id) on ``device``; ``None`` without a seed."""
        if self.seed is None:
            return None
        from narrows.runtime import derive_seed

        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, image_id))

    def _fit_one(self, bottleneck: Bottleneck, x1: torch.Tensor,
                 target: int | Callable[[torch.Tensor], torch.Tensor],
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Optimise a fresh α for one image; returns the capacity (S, nats) and its history."""
        bottleneck.reset_alpha(self.alpha_init)
        optimiser = torch.optim.Adam([bottleneck.alpha], lr=self.lr)
        bottleneck.active = False
        prefix = PrefixReplay(self.model, self.layer)
        prefix.record(x1)
        bottleneck.active, bottleneck.expand_to = True, self.batch_size
        history: list[torch.Tensor] = []
        cap = None
        try:
            with prefix.active():
                for _ in range(self.steps):
                    logits = self.model(x1)
                    loss = _task_loss(logits, target) + self.beta * bottleneck.capacity.mean()
                    (grad,) = torch.autograd.grad(loss, bottleneck.alpha)
                    cap = bottleneck.capacity.detach().mean(dim=0).cpu()
                    if self.record_steps:
                        history.append(cap)
                    bottleneck.alpha.grad = grad
                    optimiser.step()
                if self.final_eval:
                    with torch.no_grad():
                        self.model(x1)
                    cap = bottleneck.capacity.detach().mean(dim=0).cpu()
        finally:
            bottleneck.expand_to = None
        assert cap is not None
        return cap, history

    def _meta(self, seconds: list[float], shape: tuple[int, ...]) -> dict[str, Any]:
        stats = self.statistics
        forwards = self.steps + int(self.final_eval)
        return {
            "method": "IBA", "variant": "per_sample", "layer": self.layer, "beta": self.beta,
            "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
            "alpha_init": self.alpha_init, "sigma": self.sigma, "final_eval": self.final_eval,
            "seed": self.seed,
            "relu": bool(stats.relu if self.relu is None else self.relu),
            "statistics": {"kind": stats.kind, "n": stats.n, "min_std": stats.min_std},
            "feature_shape": list(shape), "units": "bits per input pixel", "signed": False,
            "forwards_per_image": forwards,
            "prefix_images_per_image": 1,
            "suffix_samples_per_image": forwards * self.batch_size,
            "seconds_per_image": seconds, "seconds_total": float(sum(seconds)),
        }


def as_batch(inputs: torch.Tensor) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() not in (3, 4):
        raise UserError("inputs must be an image tensor (C, H, W) or a batch (N, C, H, W)",
                        "pass normalised images as a float tensor")
    return inputs[None] if inputs.dim() == 3 else inputs


def per_image_targets(target: Target, n: int) -> list[Any]:
    if callable(target) and not isinstance(target, torch.Tensor):
        return [target] * n
    if isinstance(target, torch.Tensor):
        flat = target.reshape(-1)
        if flat.numel() == 1:
            return [int(flat.item())] * n
        if flat.numel() != n:
            raise UserError(f"{flat.numel()} targets for {n} images",
                            "give one class per image, a single class, or a loss callable")
        return [int(t) for t in flat.tolist()]
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return [int(target)] * n
    raise UserError(f"target of type {type(target).__name__} is not understood",
                    "give an int, a tensor of classes, or a callable logits -> scalar loss")


def _task_loss(logits: torch.Tensor, target: int | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if callable(target):
        loss = target(logits)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise UserError("the target callable must return a scalar loss tensor",
                            "e.g. lambda logits: -logits.log_softmax(-1)[:, 3].mean()")
        return loss.reshape(())
    if not 0 <= target < logits.shape[-1]:
        raise UserError(f"target class {target} is outside 0..{logits.shape[-1] - 1}",
                        "give a class index of the model's output")
    labels = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients inside the block; both restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

