"""Readout bottleneck (spec §6): a small network predicts α from one clean pass, in one shot.

Two passes per batch, with hooks only (the model is never modified):

1. a no-grad pass of the frozen classifier records the readout feature maps and the logits;
2. each readout map is standardised with its own statistics, σ clamped below by ``min_std``
   (the upstream readout training divides by the raw σ, which gives NaN for dead units, §14.2),
   resized bilinearly (``align_corners=True``) to the bottleneck's (h, w) and concatenated
   with the standardised logits broadcast over (h, w); three 1×1 convs
   (F_in → F_in/2 → K → F_out, ReLU between) predict α per bottleneck element, clamped to
   [−5, 5];
3. a second pass runs with the bottleneck at the layer: λ = blur(sigmoid(α)), noise and
   capacity exactly as the per-sample bottleneck (§1).

``K = 2·F_out`` (variant ``"B"``, IBA package, default) or ``F_out/4`` (variant ``"A"``, paper
"Readout Dense 10"). The first conv is evaluated at each readout's native resolution and the
results upsampled and summed (the conv commutes with the bilinear resize); ``naive=True``
resizes the maps first, as written in the spec (same result up to rounding).

Default layers (:func:`default_readout_layers`): torchvision / timm ResNets put the bottleneck
at ``layer1`` and read ``layer1..layer4``; the 3-stage CIFAR ResNets of narrows put it at
``layer1`` (stride 1, 16×H×W) and read ``layer1..layer3`` (three maps, there is no fourth
stage); VGG-like ``features`` models use the paper code's conv3_1 / conv4_1 / conv5_1 / conv5_3.
The logits are always the model's output.

Files: :func:`save_readout` writes a self-describing readout (net, layers, variant, σ,
statistics, input shape, fingerprint of the model's weights, model card); :func:`load_readout`
rebuilds it for a model strictly (any mismatch is a one-line :class:`UserError`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from narrows.attribution.bottleneck import Bottleneck
from narrows.attribution.heatmap import AttributionResult, heatmap_from_capacity
from narrows.attribution.per_sample import as_batch, frozen, per_image_targets
from narrows.attribution.statistics import (
    MIN_SAMPLES,
    FeatureStatistics,
    Kind,
    batch_images,
)
from narrows.errors import UserError
from narrows.models.checkpoints import model_fingerprint
from narrows.models.layers import capture, get_layer
from narrows.runs.files import read_torch_file

ALPHA_LIMIT = 5.0
CHECKPOINT = "readout_last.pt"
_FORMAT = "narrows.readout-checkpoint/1"
_STATS_FORMAT = "narrows.readout-statistics/1"
READOUT_FORMAT = "narrows.readout/1"
_TENSOR_FIX = "choose readout layers whose outputs are single tensors"


# -- layers ----------------------------------------------------------------------------------
def default_readout_layers(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """``(bottleneck layer, readout feature layers)`` of ``model``, for ResNets and VGG-like models.

    * ``layer4`` present (torchvision / timm ResNets): ``layer1`` and ``layer1..layer4``.
    * ``layer3`` but no ``layer4`` (narrows' CIFAR ResNets): ``layer1`` and ``layer1..layer3``.
    * ``features`` Sequential (VGG): the first conv after the 2nd max-pool (``features.10`` on
      VGG-16) and the first convs after pools 2, 3, 4 plus the last conv (10, 17, 24, 28).
    """
    children = dict(model.named_children())
    if "layer1" in children and "layer4" in children:
        return "layer1", ("layer1", "layer2", "layer3", "layer4")
    if "layer1" in children and "layer3" in children:
        return "layer1", ("layer1", "layer2", "layer3")
    features = children.get("features")
    if isinstance(features, nn.Sequential):
        pools, firsts, last = 0, {}, None
        for index, module in enumerate(features):
            if isinstance(module, nn.MaxPool2d):
                pools += 1
            elif isinstance(module, nn.Conv2d):
                firsts.setdefault(pools, index)
                last = index
        if all(p in firsts for p in (2, 3, 4)) and last is not None:
            names = [f"features.{firsts[p]}" for p in (2, 3, 4)] + [f"features.{last}"]
            return names[0], tuple(dict.fromkeys(names))
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        raise UserError(f"the readout bottleneck reads convolutional feature maps and "
                        f"{type(model).__name__} gives token maps",
                        "use per-sample IBA on ViTs (attribution explain / evaluate --methods "
                        "iba)")
    raise UserError(f"no default readout layers are known for {type(model).__name__}",
                    "pass --layer and --readout-layers (layer= and readout_layers= in Python), "
                    "convolutional layers of the model")


# -- statistics ------------------------------------------------------------------------------
@dataclass
class ReadoutStatistics:
    """Statistics of the bottleneck layer (noise model), of each readout layer and of the logits.

    The readout maps and logits are standardised with Welford μ and σ (σ ≥ ``min_std``);
    ``bottleneck`` may be of either kind.
    """

    bottleneck: FeatureStatistics
    readouts: dict[str, FeatureStatistics]
    logits: FeatureStatistics

    def state(self) -> dict[str, Any]:
        """Plain tensors and values (``torch.load(weights_only=True)`` reads them back)."""
        return {"format": _STATS_FORMAT, "bottleneck": self.bottleneck.state(),
                "readout_layers": list(self.readouts),
                "readouts": [self.readouts[name].state() for name in self.readouts],
                "logits": self.logits.state()}

    @classmethod
    def from_state(cls, state: Any, source: str = "state") -> ReadoutStatistics:
        """Rebuild from :meth:`state`; anything inconsistent is a :class:`UserError`."""
        fix = "re-estimate the readout statistics"
        if not isinstance(state, dict) or state.get("format") != _STATS_FORMAT:
            raise UserError(f"{source} holds no readout statistics ({_STATS_FORMAT})", fix)
        names, states = state.get("readout_layers"), state.get("readouts")
        if not isinstance(names, list) or not isinstance(states, list) \
                or len(names) != len(states) or not names:
            raise UserError(f"{source}: the readout layers and their statistics do not match",
                            fix)
        readouts = {str(n): FeatureStatistics.from_state(s, source=f"{source} ({n})")
                    for n, s in zip(names, states, strict=True)}
        return cls(FeatureStatistics.from_state(state.get("bottleneck"), source=source),
                   readouts, FeatureStatistics.from_state(state.get("logits"), source=source))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state` atomically."""
        from narrows.runs.files import atomic_torch_save

        return atomic_torch_save(path, self.state())

    @classmethod
    def load(cls, path: str | Path) -> ReadoutStatistics:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        state = read_torch_file(path, "readout statistics file",
                                 "re-estimate the readout statistics")
        return cls.from_state(state, source=str(path))


@torch.no_grad()
def estimate_readout_statistics(model: nn.Module, batches: Iterable[Any], *,
                                layer: str | None = None,
                                readout_layers: Sequence[str] | None = None,
                                n_samples: int = 10_000, kind: Kind = "welford",
                                min_std: float = 0.01,
                                device: str | torch.device | None = None,
                                warn: bool = True, normalizer: Any = None,
                                batch_size: int = 128) -> ReadoutStatistics:
    """All statistics a readout of ``model`` needs (a :class:`ReadoutStatistics`), from one
    eval-mode forward per batch of ``batches``.

    ``layer`` (the bottleneck) and ``readout_layers`` default to
    :func:`default_readout_layers`; ``kind`` is the bottleneck's noise model (``"welford"`` or
    ``"relu_rms"``; the readout layers and logits always use ``"welford"``); every σ is clamped
    below by ``min_std``.

    Exactly ``n_samples`` images are used (or all, when ``batches`` runs out first);
    ``batches``, ``normalizer``, ``batch_size`` and ``warn`` as in
    :func:`~narrows.attribution.statistics.estimate_statistics`.
    """
    from narrows.attribution.inputs import as_normalizer, model_inputs
    from narrows.attribution.statistics import image_batches

    layer, readout_layers = _resolve_layers(model, layer, readout_layers)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    bottleneck = FeatureStatistics(kind, layer=layer, min_std=min_std)
    readouts = {name: FeatureStatistics("welford", layer=name, min_std=min_std)
                for name in readout_layers}
    logits = FeatureStatistics("welford", layer="logits", min_std=min_std)
    captured: dict[str, torch.Tensor] = {}
    names = list(dict.fromkeys([layer, *readout_layers]))
    with frozen(model), capture(model, names, captured, fix=_TENSOR_FIX):
        normalise = as_normalizer(normalizer)
        for batch in image_batches(batches, batch_size):
            images = batch_images(batch)[: max(n_samples - logits.n, 0)]
            if images.shape[0]:
                captured.clear()
                out = model(model_inputs(images.to(device), normalise))
                bottleneck.update(captured[layer])
                for name in readout_layers:
                    readouts[name].update(captured[name])
                logits.update(out)
            if logits.n >= n_samples:
                break
    if warn and logits.n < MIN_SAMPLES:
        warnings.warn(f"readout statistics from only {logits.n} samples; use at least "
                      f"{MIN_SAMPLES} (10,000 recommended)", stacklevel=2)
    return ReadoutStatistics(bottleneck, readouts, logits)


def resolve_readout_layers(model: nn.Module, layer: str | None = None,
                           readout_layers: Sequence[str] | None = None,
                           ) -> tuple[str, tuple[str, ...]]:
    """``(bottleneck layer, readout layers)``: the given ones (checked to exist) or the
    defaults of :func:`default_readout_layers`; a :class:`UserError` when there are none."""
    return _resolve_layers(model, layer, readout_layers)


def _resolve_layers(model: nn.Module, layer: str | None,
                    readout_layers: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    if layer is None or readout_layers is None:
        default_layer, default_readouts = default_readout_layers(model)
        layer = default_layer if layer is None else layer
        readout_layers = default_readouts if readout_layers is None else readout_layers
    readout_layers = tuple(readout_layers)
    if not readout_layers:
        raise UserError("a readout needs at least one readout layer",
                        "pass readout_layers=[...] or use default_readout_layers(model)")
    for name in (layer, *readout_layers):
        get_layer(model, name)
    return layer, readout_layers


# -- the bottleneck with a predicted, per-sample α --------------------------------------------
class _PredictedBottleneck(Bottleneck):
    """The §1 bottleneck whose α comes from ``predicted`` (B, C, h, w) instead of a parameter."""

    def __init__(self, stats: FeatureStatistics, *, sigma: float, relu: bool | None) -> None:
        super().__init__(stats.mean, stats.std, stats.active, alpha_init=0.0, sigma=sigma,
                         relu=stats.relu if relu is None else relu)
        shape = tuple(self.alpha.shape)
        del self.alpha  # not trained: keep only its shape (used by the shape check)
        self.register_buffer("alpha", torch.zeros(shape), persistent=False)
        self.predicted: torch.Tensor | None = None

    def _blur_batch(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spatial:
            return x
        channels, pad = x.shape[1], self.kernel.shape[-1] // 2
        mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
        padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
        return F.conv2d(padded, self.kernel.expand(channels, 1, -1, -1), groups=channels)

    def lambdas(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.predicted is None:
            raise RuntimeError("the readout bottleneck ran without a predicted α")
        a = self.predicted
        return self._blur_batch(torch.sigmoid(a)), self._blur_batch(torch.sigmoid(-a))


class ReadoutBottleneck(nn.Module):
    """Predicts α for the bottleneck at ``layer`` from readout maps and logits (spec §6).

    ``model`` is the classifier; ``statistics`` give the bottleneck and readout layers.
    ``variant``: ``"B"`` (K = 2·F_out, IBA package) or ``"A"`` (K = F_out/4); ``sigma`` blurs
    λ as in :class:`Bottleneck`; ``relu`` (default: the statistics' kind) clamps the
    bottleneck's output at ≥ 0; ``naive`` resizes the readout maps before the first conv
    (module docstring).

    Only the readout net (``conv1..conv3``) is trainable; statistics are buffers. The classifier
    is held by reference (not a sub-module: it is not in ``state_dict`` nor moved by ``.to``)
    and must be frozen and in eval mode when :meth:`forward` runs (``train_readout`` and
    :class:`ReadoutIBA` see to that).
    """

    def __init__(self, model: nn.Module, statistics: ReadoutStatistics, *,
                 variant: str = "B", sigma: float = 1.0, relu: bool | None = None,
                 naive: bool = False) -> None:
        super().__init__()
        if variant not in ("A", "B"):
            raise UserError(f"unknown readout variant '{variant}'",
                            "use 'B' (K = 2·F_out, IBA package) or 'A' (K = F_out/4)")
        self.__dict__["model"] = model  # a reference, not a registered sub-module
        self.layer = statistics.bottleneck.layer
        self.readout_layers = tuple(statistics.readouts)
        get_layer(model, self.layer)
        for name in self.readout_layers:
            get_layer(model, name)
        if statistics.bottleneck.shape is None or len(statistics.bottleneck.shape) != 3:
            raise UserError(f"the bottleneck layer '{self.layer}' must give (C, h, w) maps, "
                            f"not {statistics.bottleneck.shape}",
                            "choose a convolutional layer for the readout bottleneck")
        self.variant, self.naive, self.sigma = variant, naive, float(sigma)
        self.statistics = statistics
        self.input_shape: tuple[int, ...] | None = None  # (C, H, W), set by load_readout
        self.bottleneck = _PredictedBottleneck(statistics.bottleneck, sigma=sigma, relu=relu)
        for i, name in enumerate(self.readout_layers):
            stats = statistics.readouts[name]
            if stats.shape is None or len(stats.shape) != 3:
                raise UserError(f"readout layer '{name}' gives features shaped {stats.shape}",
                                "choose readout layers with (C, h, w) maps")
            self.register_buffer(f"readout_mean_{i}", stats.mean)
            self.register_buffer(f"readout_std_{i}", stats.std)
        self.register_buffer("logits_mean", statistics.logits.mean)
        self.register_buffer("logits_std", statistics.logits.std)
        self.channels = [statistics.readouts[n].shape[0] for n in self.readout_layers]
        num_classes = statistics.logits.shape[0]
        f_out, (h, w) = statistics.bottleneck.shape[0], statistics.bottleneck.shape[1:]
        self.size = (int(h), int(w))
        f_in = sum(self.channels) + num_classes
        hidden = max(1, f_in // 2)
        k = 2 * f_out if variant == "B" else max(1, f_out // 4)
        self.conv1 = nn.Conv2d(f_in, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, k, 1)
        self.conv3 = nn.Conv2d(k, f_out, 1)
        with torch.no_grad():  # α ≈ 5 everywhere at the start: near-identity, λ ≈ 0.993
            self.conv3.weight.mul_(1e-3)
            self.conv3.bias.fill_(ALPHA_LIMIT)
        self._running = False

    @property
    def model(self) -> nn.Module:
        return self.__dict__["model"]

    def readout_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: the three 1×1 convs."""
        return [*self.conv1.parameters(), *self.conv2.parameters(), *self.conv3.parameters()]

    # -- first pass ---------------------------------------------------------------------------
    @torch.no_grad()
    def readouts(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The clean pass: standardised readout maps (native sizes) and standardised logits."""
        store: dict[str, torch.Tensor] = {}
        with capture(self.model, self.readout_layers, store, fix=_TENSOR_FIX):
            logits = self.model(x)
        maps = []
        for i, name in enumerate(self.readout_layers):
            mean, std = getattr(self, f"readout_mean_{i}"), getattr(self, f"readout_std_{i}")
            maps.append((store[name] - mean) / std.clamp(min=1e-12))
        return maps, (logits - self.logits_mean) / self.logits_std.clamp(min=1e-12)

    def predict_alpha(self, maps: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """α (B, C, h, w) in [−5, 5] from the standardised readout maps and logits."""
        h, w = self.size
        batch = logits.shape[0]
        if self.naive:
            resized = [_resize(m, self.size) for m in maps]
            stack = torch.cat([*resized, logits[:, :, None, None].expand(-1, -1, h, w)], dim=1)
            hidden = self.conv1(stack)
        else:
            weight = self.conv1.weight[:, :, 0, 0]
            hidden = (logits @ weight[:, sum(self.channels):].T + self.conv1.bias)
            hidden = hidden[:, :, None, None].expand(batch, -1, h, w)
            start = 0
            for m, c in zip(maps, self.channels, strict=True):
                part = F.conv2d(m, weight[:, start:start + c, None, None])
                hidden = hidden + _resize(part, self.size)
                start += c
        alpha = self.conv3(F.relu(self.conv2(F.relu(hidden))))
        return alpha.clamp(-ALPHA_LIMIT, ALPHA_LIMIT)

    # -- both passes --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the noisy pass, capacity B×C×h×w in nats).

        ``target`` is not used: α depends only on the clean features and logits (§6); it is
        accepted so that a readout can stand where a target-taking callable is expected.
        """
        if self._running:
            raise RuntimeError("ReadoutBottleneck.forward re-entered (nested model call)")
        self._running = True
        try:
            maps, logits = self.readouts(x)
            alpha = self.predict_alpha(maps, logits)
            self.bottleneck.predicted = alpha
            with self.bottleneck.attached(self.model, self.layer):
                noisy = self.model(x)
            cap = self.bottleneck.capacity
            assert cap is not None
            return noisy, cap
        finally:
            self.bottleneck.predicted = None
            self._running = False


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# -- training --------------------------------------------------------------------------------
def train_readout(model: nn.Module, readout: ReadoutBottleneck,
                  data_loader_factory: Callable[[int], Iterable[Any]], *, epochs: int,
                  beta: float = 10.0, lr: float = 1e-5,
                  device: str | torch.device = "cpu", out_dir: Path | str | None = None,
                  seed: int = 0, progress: bool = True,
                  log: Callable[[str], Any] | None = print,
                  on_epoch: Callable[[list[dict[str, Any]]], Any] | None = None,
                  logger: Any = None) -> list[dict[str, Any]]:
    """Train the ``readout`` net of the classifier ``model``: loss = CE(noisy logits, label) +
    β·mean(capacity) with β = ``beta``, Adam with learning rate ``lr``, for ``epochs`` epochs.

    ``data_loader_factory(epoch)`` gives that epoch's (images, labels) batches (normalised
    images). The classifier is frozen and in eval mode throughout. Before each epoch torch's
    RNG is seeded from ``(seed, epoch)``, so the noise draws depend only on them. With
    ``out_dir``, ``readout_last.pt`` (readout and optimiser states, epoch, metrics) is written
    atomically after every epoch, and a present one is resumed from at the next epoch; a
    resumed run then equals an uninterrupted one (on CPU). Returns the per-epoch metrics of
    all epochs (including resumed ones): loss, ce, capacity (mean nats), samples, seconds.
    ``on_epoch(history)`` is called after each epoch's checkpoint is written. An active
    ``logger`` (:class:`narrows.runs.logger.RunLogger`) gets each step's loss, cross-entropy
    and capacity as ``train/...`` and each epoch's metrics as ``epoch/...`` at its last step
    (steps counted from the start, when the loader has a length).
    """
    from tqdm.auto import tqdm

    from narrows.runs.files import atomic_torch_save
    from narrows.runtime import derive_seed

    if readout.model is not model:
        raise UserError("the readout was built for another model",
                        "build ReadoutBottleneck(model, ...) with the model being trained on")
    if epochs < 1:
        raise UserError(f"epochs={epochs} must be ≥ 1", "train for at least one epoch")
    device = torch.device(device)
    model.to(device)
    readout.to(device)
    optimizer = torch.optim.Adam(readout.readout_parameters(), lr=lr)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if path is not None and path.is_file():
        start_epoch, history = _resume(path, readout, optimizer, device)
        if log is not None and start_epoch >= epochs:
            log(f"readout training in {path} already finished ({start_epoch} epochs)")
        elif log is not None:
            log(f"resuming readout training from {path} at epoch {start_epoch + 1}/{epochs}")
    readout.train()
    with frozen(model):
        for epoch in range(start_epoch, epochs):
            torch.manual_seed(derive_seed(seed, epoch))
            started = time.perf_counter()
            sums = {"loss": 0.0, "ce": 0.0, "capacity": 0.0}
            seen = 0
            loader = data_loader_factory(epoch)
            first = epoch * len(loader) if hasattr(loader, "__len__") else None  # global step
            logging = logger is not None and logger.active and first is not None
            if logging and epoch == start_epoch > 0:
                logger.resume_at(first)  # drop what a killed run logged of this epoch
            batches = tqdm(loader, desc=f"readout {epoch + 1}/{epochs}",
                           leave=False, disable=None if progress else True)
            for step, batch in enumerate(batches):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise UserError("readout training needs (images, labels) batches",
                                    "make data_loader_factory(epoch) yield (images, labels)")
                images, labels = batch[0].to(device), batch[1].to(device)
                logits, cap = readout(images)
                ce = F.cross_entropy(logits, labels)
                cap_mean = cap.mean()
                loss = ce + beta * cap_mean
                if not torch.isfinite(loss):
                    raise UserError(f"the readout loss became {loss.item()} in epoch {epoch + 1}",
                                    "lower the learning rate; check the statistics (min_std)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = int(labels.shape[0])
                values = {"loss": float(loss.detach()), "ce": float(ce.detach()),
                          "capacity": float(cap_mean.detach())}
                for name, value in values.items():
                    sums[name] += value * n
                seen += n
                if logging:
                    logger.scalars(values, first + step, prefix="train")
            if seen == 0:
                raise UserError(f"epoch {epoch + 1} had no batches",
                                "make data_loader_factory(epoch) yield at least one batch")
            metrics = {"epoch": epoch + 1, **{k: v / seen for k, v in sums.items()},
                       "samples": seen, "seconds": time.perf_counter() - started}
            history.append(metrics)
            if logging:  # at the epoch's last step: one x axis, which a resume's purge keeps
                logger.scalars(metrics, first + step, prefix="epoch")
            if path is not None:
                atomic_torch_save(path, {"format": _FORMAT, "epoch": epoch,
                                         "readout": readout.state_dict(),
                                         "optimizer": optimizer.state_dict(),
                                         "metrics": history, "seed": seed, "beta": beta,
                                         "lr": lr})
            if log is not None:
                log(f"readout epoch {epoch + 1}/{epochs}: loss {metrics['loss']:.4f} "
                    f"ce {metrics['ce']:.4f} capacity {metrics['capacity']:.4f} nats")
            if on_epoch is not None:
                on_epoch(history)
    readout.eval()
    return history


def _resume(path: Path, readout: ReadoutBottleneck, optimizer: torch.optim.Optimizer,
            device: torch.device) -> tuple[int, list[dict[str, Any]]]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a readable readout checkpoint ({exc})",
                        "delete it to start the readout training afresh") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise UserError(f"{path} is not a readout checkpoint",
                        "delete it to start the readout training afresh")
    try:
        readout.load_state_dict(state["readout"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{path} does not fit this readout ({exc})",
                        "use a fresh out_dir or the same model, layers and statistics") from exc
    return int(state["epoch"]) + 1, list(state.get("metrics", []))


# -- files -----------------------------------------------------------------------------------
def save_readout(path: str | Path, readout: ReadoutBottleneck, *,
                 input_shape: Sequence[int] | None = None, card: Any = None,
                 checkpoint: str | None = None,
                 training: dict[str, Any] | None = None) -> Path:
    """Write a self-describing readout file atomically (``torch.load(weights_only=True)``-safe).

    It holds the readout net's state dict, the bottleneck and readout layers, variant, σ, ReLU
    clamp, the statistics, the (C, H, W) input shape, the fingerprint of the model's weights
    and, when given, the model card (a ``ModelCard`` or its ``to_dict()``), the checkpoint path
    and training settings. :func:`load_readout` rebuilds the readout from it.
    """
    from narrows.runs.files import atomic_torch_save

    if card is not None and hasattr(card, "to_dict"):
        card = card.to_dict()
    state = {"format": READOUT_FORMAT, "layer": readout.layer,
             "readout_layers": list(readout.readout_layers), "variant": readout.variant,
             "sigma": readout.sigma, "relu": bool(readout.bottleneck.relu),
             "naive": bool(readout.naive), "statistics": readout.statistics.state(),
             "state_dict": {k: v.detach().cpu() for k, v in readout.state_dict().items()},
             "input_shape": None if input_shape is None else [int(v) for v in input_shape],
             "model_fingerprint": model_fingerprint(readout.model), "card": card,
             "checkpoint": checkpoint, "training": dict(training or {})}
    return atomic_torch_save(path, state)


def read_readout(path: str | Path) -> dict[str, Any]:
    """The contents of a :func:`save_readout` file, checked for its format and keys."""
    path = Path(path)
    fix = "pass a readout.pt written by 'narrows attribution readout-train'"
    state = read_torch_file(path, "readout file", fix)
    if not isinstance(state, dict) or state.get("format") != READOUT_FORMAT:
        raise UserError(f"{path} is not a readout file (format {READOUT_FORMAT})", fix)
    missing = [k for k in ("layer", "readout_layers", "variant", "sigma", "relu", "statistics",
                           "state_dict") if k not in state]
    if missing:
        raise UserError(f"{path} is an incomplete readout file (missing {', '.join(missing)})",
                        fix)
    return state


def _trained_for(state: dict[str, Any]) -> str:
    card = state.get("card") or {}
    parts = [str(card.get("architecture", "")) if isinstance(card, dict) else "",
             str(state.get("checkpoint") or "")]
    text = " ".join(p for p in parts if p)
    return f" ({text})" if text else ""


@torch.no_grad()
def _check_shapes(path: Path, model: nn.Module, readout: ReadoutBottleneck,
                  input_shape: Sequence[int]) -> None:
    """One forward of zeros: every layer must give the shapes the statistics were taken at."""
    stats = readout.statistics
    expected = {readout.layer: stats.bottleneck.shape,
                **{n: stats.readouts[n].shape for n in readout.readout_layers}}
    store: dict[str, torch.Tensor] = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with frozen(model), capture(model, list(expected), store, fix=_TENSOR_FIX):
        logits = model(torch.zeros(1, *input_shape, device=device))
    got = {n: tuple(store[n].shape[1:]) for n in expected}
    got["logits"], expected["logits"] = tuple(logits.shape[1:]), stats.logits.shape
    for name, shape in expected.items():
        if got[name] != tuple(shape or ()):
            raise UserError(f"{path} does not fit this model: '{name}' gives {got[name]}, the "
                            f"readout expects {tuple(shape or ())}",
                            "use the model (and image size) the readout was trained for")


def load_readout(path: str | Path, model: nn.Module, *,
                 check_weights: bool = True) -> ReadoutBottleneck:
    """Rebuild a readout written by :func:`save_readout` for ``model``, strictly.

    The layers must exist and give the recorded shapes, the state dict must match key for key
    and shape for shape, and (``check_weights``) the model's weights must be those the readout
    was trained for; any mismatch is a one-line :class:`UserError`. The readout is returned in
    eval mode on the model's device.
    """
    path = Path(path)
    state = read_readout(path)
    stats = ReadoutStatistics.from_state(state["statistics"], source=str(path))
    if list(stats.readouts) != list(state["readout_layers"]) \
            or stats.bottleneck.layer != state["layer"]:
        raise UserError(f"{path}: its statistics are for other layers than its readout",
                        "train the readout again")
    fingerprint = state.get("model_fingerprint")
    if check_weights and fingerprint and fingerprint != model_fingerprint(model):
        raise UserError(f"{path} was trained for other model weights{_trained_for(state)}",
                        "use the checkpoint the readout was trained for, or train a readout "
                        "for this model")
    try:
        readout = ReadoutBottleneck(model, stats, variant=str(state["variant"]),
                                    sigma=float(state["sigma"]), relu=bool(state["relu"]),
                                    naive=bool(state.get("naive", False)))
    except UserError as exc:
        raise UserError(f"{path} does not fit this model: {exc.what}",
                        "use the model the readout was trained for") from exc
    try:
        readout.load_state_dict(state["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:200]
        raise UserError(f"{path} does not fit its own layers and statistics ({detail})",
                        "the file is damaged: train the readout again") from exc
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    readout.to(device).eval()
    input_shape = state.get("input_shape")
    if input_shape:
        _check_shapes(path, model, readout, input_shape)
    readout.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
    return readout


# -- attribution -----------------------------------------------------------------------------
class ReadoutIBA:
    """Heatmaps from a trained ``readout``: one clean and one noisy forward per batch of
    ``batch_size`` images; :meth:`attribute` returns an :class:`AttributionResult`.
    ``normalizer`` makes it take [0, 1] images (see :mod:`narrows.attribution.inputs`)."""

    def __init__(self, readout: ReadoutBottleneck, *, batch_size: int = 32,
                 normalizer: Any = None) -> None:
        from narrows.attribution.inputs import as_normalizer

        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} must be ≥ 1", "use e.g. 32")
        self.readout, self.batch_size = readout, batch_size
        self.normalizer = as_normalizer(normalizer)

    @torch.no_grad()
    def attribute(self, inputs: torch.Tensor, target: Any = None) -> AttributionResult:
        """Bits-per-pixel heatmaps (N, H, W) for (C, H, W) or (N, C, H, W) inputs.

        The maps do not depend on ``target`` (the readout sees the logits, not the label); it
        is recorded in the result (an int or one class per image; None: the predicted class).
        With a ``normalizer`` the inputs are [0, 1] images, normalised first.
        """
        from narrows.attribution.inputs import model_inputs

        x = model_inputs(as_batch(inputs), self.normalizer)
        readout, model = self.readout, self.readout.model
        size = (int(x.shape[-2]), int(x.shape[-1]))
        heatmaps, caps, predicted = [], [], []
        was_training = readout.training
        readout.eval()
        start = time.perf_counter()
        try:
            with frozen(model):
                for i in range(0, x.shape[0], self.batch_size):
                    logits, cap = readout(x[i:i + self.batch_size])
                    predicted.extend(int(c) for c in logits.argmax(dim=-1).tolist())
                    for c in cap.detach().cpu():
                        caps.append(c)
                        heatmaps.append(heatmap_from_capacity(c, size).numpy())
        finally:
            readout.train(was_training)
        seconds = time.perf_counter() - start
        targets = predicted if target is None else [int(t) for t in per_image_targets(target, x.shape[0])]
        meta = {"method": "IBA", "variant": "readout", "layer": readout.layer,
                "readout_layers": list(readout.readout_layers),
                "readout_variant": readout.variant, "sigma": readout.sigma,
                "relu": bool(readout.bottleneck.relu), "feature_shape": list(caps[0].shape),
                "units": "bits per input pixel", "signed": False,
                "target_from": "argmax" if target is None else "given",
                "seconds_total": seconds, "forwards_per_batch": 2}
        return AttributionResult(heatmaps=np.stack(heatmaps), targets=targets,
                                 capacity=torch.stack(caps).numpy(), meta=meta)
