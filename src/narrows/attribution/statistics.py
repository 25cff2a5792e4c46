"""Per-element feature statistics of one layer (spec §2): the noise model's μ, σ and mask.

Accumulators are float64 and updated batch-wise with Chan's parallel formula, which gives the
same mean and M2 as a per-sample Welford loop (up to rounding) at a fraction of the cost.

``kind="welford"`` (default, IBA package): μ = mean, σ = unbiased std.
``kind="relu_rms"`` (paper code, post-ReLU layers): μ = 0, σ = root mean square of the non-zero
values, and the bottleneck clamps Z at ≥ 0. In both kinds σ is clamped below by ``min_std`` and an
element is active when it is non-zero in more than 1% of the samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from narrows.errors import UserError

Kind = Literal["welford", "relu_rms"]
KINDS: tuple[str, ...] = ("welford", "relu_rms")
ACTIVE_FRACTION = 0.01
MIN_SAMPLES = 1000
_FORMAT = "narrows.feature-statistics/1"


class FeatureStatistics:
    """Streaming per-element mean, M2, non-zero count and sum of squares of one layer's output.

    ``kind`` is the noise model (module docstring), ``layer`` the layer's name, ``min_std`` the
    floor of σ and ``model_fingerprint`` the weights estimated on. Fill it with :meth:`update`
    (or :func:`estimate_statistics`); read :attr:`mean`, :attr:`std` and :attr:`active`."""

    def __init__(self, kind: Kind = "welford", *, layer: str = "", min_std: float = 0.01,
                 model_fingerprint: str = "") -> None:
        if kind not in KINDS:
            raise UserError(f"unknown statistics kind '{kind}'", f"use one of {', '.join(KINDS)}")
        self.kind: Kind = kind
        self.layer = layer
        self.min_std = float(min_std)
        self.model_fingerprint = model_fingerprint  # of the weights estimated on; "" = unknown
        self.n = 0
        self.shape: tuple[int, ...] | None = None
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._nonzero: torch.Tensor | None = None
        self._sumsq: torch.Tensor | None = None

    # -- accumulation ------------------------------------------------------------------------
    def update(self, batch: torch.Tensor) -> None:
        """Add a batch of features shaped (B, *S)."""
        x = batch.detach().to("cpu", torch.float64)
        shape = tuple(x.shape[1:])
        if self.shape is None:
            self.shape = shape
            zeros = torch.zeros(shape, dtype=torch.float64)
            self._mean, self._m2, self._nonzero, self._sumsq = (zeros.clone() for _ in range(4))
        elif shape != self.shape:
            raise UserError(f"feature shape {shape} differs from the earlier {self.shape}",
                            "feed images of one resolution (statistics depend on h and w)")
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        m2_b = ((x - mean_b) ** 2).sum(dim=0)
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (n_a * n_b / n)
        self._nonzero = self._nonzero + (x != 0).sum(dim=0).to(torch.float64)
        self._sumsq = self._sumsq + (x**2).sum(dim=0)
        self.n = n

    # -- derived values (float32) ------------------------------------------------------------
    def _require(self) -> None:
        if self.n < 2 or self._mean is None:
            raise UserError(f"statistics of layer '{self.layer}' hold {self.n} samples",
                            "estimate them on at least 1,000 images (10,000 recommended)")

    @property
    def relu(self) -> bool:
        """Whether the bottleneck should clamp its output at ≥ 0 (``kind="relu_rms"``)."""
        return self.kind == "relu_rms"

    @property
    def mean(self) -> torch.Tensor:
        """μ of the noise: the element mean, or 0 for ``relu_rms``."""
        self._require()
        if self.kind == "relu_rms":
            return torch.zeros(self.shape, dtype=torch.float32)
        return self._mean.float()

    @property
    def std(self) -> torch.Tensor:
        """σ of the noise, clamped below by ``min_std``."""
        self._require()
        if self.kind == "relu_rms":
            raw = torch.sqrt(self._sumsq / self._nonzero.clamp(min=1))
        else:
            raw = torch.sqrt(self._m2 / (self.n - 1))
        return raw.clamp(min=self.min_std).float()

    @property
    def active(self) -> torch.Tensor:
        """Bool mask: the element is non-zero in more than 1% of the samples."""
        self._require()
        return (self._nonzero / self.n) > ACTIVE_FRACTION

    # -- files -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        self._require()
        return {"format": _FORMAT, "kind": self.kind, "layer": self.layer,
                "shape": list(self.shape), "n": self.n, "min_std": self.min_std,
                "model_fingerprint": self.model_fingerprint,
                "mean": self._mean, "m2": self._m2, "nonzero": self._nonzero, "sumsq": self._sumsq}

    def save(self, path: str | Path) -> Path:
        """Write a torch file (atomically) with the accumulators, layer, shape, kind and n."""
        from narrows.runs.files import atomic_torch_save

        return atomic_torch_save(path, self.state())

    @classmethod
    def load(cls, path: str | Path) -> FeatureStatistics:
        """Read a file written by :meth:`save`; anything inconsistent raises a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no statistics file {path}", "estimate statistics first and save them")
        from narrows.runs.files import read_torch_file

        state = read_torch_file(path, "statistics file", "estimate the statistics again with "
                                "'narrows attribution stats'")
        return cls.from_state(state, source=str(path))

    @classmethod
    def from_state(cls, state: Any, source: str = "state") -> FeatureStatistics:
        def bad(why: str) -> UserError:
            return UserError(f"{source} is not a valid statistics file: {why}",
                             "re-estimate the statistics and save them again")

        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise bad(f"format is not {_FORMAT}")
        if state.get("kind") not in KINDS:
            raise bad(f"unknown kind {state.get('kind')!r}")
        shape = tuple(int(s) for s in state.get("shape", ()))
        n = state.get("n")
        if not isinstance(n, int) or n < 2:
            raise bad(f"sample count {n!r}")
        for key in ("mean", "m2", "nonzero", "sumsq"):
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                raise bad(f"'{key}' is missing or not shaped {shape}")
            if not torch.isfinite(value).all():
                raise bad(f"'{key}' has non-finite values")
        stats = cls(state["kind"], layer=str(state.get("layer", "")),
                    min_std=float(state.get("min_std", 0.01)),
                    model_fingerprint=str(state.get("model_fingerprint", "") or ""))
        stats.n, stats.shape = n, shape
        stats._mean, stats._m2 = state["mean"].double(), state["m2"].double()
        stats._nonzero, stats._sumsq = state["nonzero"].double(), state["sumsq"].double()
        return stats

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model``'s weights are those the statistics were estimated on (unknown for
        files written before the fingerprint was recorded: they match)."""
        from narrows.models.checkpoints import model_fingerprint

        return not self.model_fingerprint or self.model_fingerprint == model_fingerprint(model)

    def check_model(self, model: nn.Module, source: str = "the statistics",
                    fix: str = "estimate statistics for this model with 'narrows attribution "
                    "stats', or leave --statistics out") -> None:
        """Refuse a model with other weights than those the statistics were estimated on (a
        file without a fingerprint, written before they were recorded, passes)."""
        if not self.matches(model):
            raise UserError(f"{source} were estimated on another model's weights (layer "
                            f"'{self.layer}')", fix)

    def summary(self) -> str:
        """One line: the layer, the sample count, the feature shape, the kind and the share of
        active elements."""
        shape = "×".join(str(v) for v in self.shape or ())
        line = f"statistics of '{self.layer}': n={self.n:,}, features {shape or '?'}, {self.kind}"
        if self.n >= 2 and self._mean is not None:
            line += f", {100 * float(self.active.float().mean()):.1f}% of elements active"
        return line

    def headline(self) -> dict[str, float | int | str]:
        """The flat numbers of ``results.json``: ``n``, ``layer``, ``kind``, ``elements`` and
        ``active_fraction`` (elements non-zero in more than 1% of the samples)."""
        found: dict[str, float | int | str] = {"n": self.n, "layer": self.layer,
                                                "kind": self.kind}
        if self.shape is not None:
            found["elements"] = math.prod(self.shape)
        if self.n >= 2 and self._mean is not None:
            found["active_fraction"] = float(self.active.float().mean())
        return found

    def __repr__(self) -> str:
        return (f"FeatureStatistics(kind={self.kind!r}, layer={self.layer!r}, shape={self.shape}, "
                f"n={self.n})")


def batch_images(batch: Any) -> torch.Tensor:
    """The images of ``batch``: a tensor, the first of an (images, labels) pair, or the
    ``image``/``input`` entry of a dict."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch.get("image", batch.get("input"))
    if not isinstance(batch, torch.Tensor):
        raise UserError(f"a batch is {type(batch).__name__}, not images",
                        "give an iterable of image tensors or (images, labels) pairs")
    return batch


def image_batches(source: Any, batch_size: int = 128) -> Iterable[Any]:
    """``source`` as an iterable of batches: a map-style data set is read in order in batches
    of ``batch_size``; a loader or any other iterable of batches is returned as is."""
    data = torch.utils.data
    if isinstance(source, data.Dataset) and not isinstance(source, data.IterableDataset):
        return data.DataLoader(source, batch_size=batch_size)
    return source


@torch.no_grad()
def estimate_statistics(model: nn.Module, layer: str | None, batches: Iterable[Any],
                        n_samples: int = 10_000, device: str | torch.device | None = None,
                        kind: Kind = "welford", min_std: float = 0.01,
                        warn: bool = True, *, normalizer: Any = None,
                        batch_size: int = 128) -> FeatureStatistics:
    """The :class:`FeatureStatistics` of ``layer``'s output (None: :func:`default_layer`)
    over the images of ``batches``.

    ``batches`` is a data set (read in order, ``batch_size`` images at a time), a loader or
    any iterable of image batches or (images, labels) pairs. With ``normalizer`` (a
    :class:`~narrows.training.Normalizer`, callable or ``Subject``) the images are [0, 1] and
    are normalised first; without it they are model inputs. ``kind`` and ``min_std`` are the
    noise model's (see :class:`FeatureStatistics`); ``device`` defaults to the model's.

    The model runs in eval mode and only up to the layer. Exactly ``n_samples`` images are used
    (the batch that crosses the count is cut), or all of them when ``batches`` runs out first.
    With ``warn``, fewer than 1,000 images give a :class:`UserWarning` (callers with their own
    message, such as the command line, pass ``warn=False`` and use :func:`few_samples`).
    """
    from narrows.attribution.inputs import as_normalizer, model_inputs
    from narrows.attribution.layers import default_layer, run_to_layer
    from narrows.models.checkpoints import model_fingerprint

    name = layer if layer is not None else default_layer(model)
    stats = FeatureStatistics(kind, layer=name, min_std=min_std,
                              model_fingerprint=model_fingerprint(model))
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    normalise = as_normalizer(normalizer)
    was_training = model.training
    model.eval()
    try:
        for batch in image_batches(batches, batch_size):
            images = batch_images(batch)[: max(n_samples - stats.n, 0)]
            if images.shape[0]:
                stats.update(run_to_layer(model, name, model_inputs(images.to(device),
                                                                    normalise)))
            if stats.n >= n_samples:
                break
    finally:
        model.train(was_training)
    if warn and few_samples(stats.n):
        warnings.warn(f"feature statistics from only {stats.n} samples; IBA needs at least "
                      f"{MIN_SAMPLES} (10,000 recommended)", stacklevel=2)
    return stats


def few_samples(n: int) -> bool:
    """Whether ``n`` images are fewer than IBA's statistics should have (``MIN_SAMPLES``)."""
    return n < MIN_SAMPLES


DEFAULT_N_SAMPLES = 10_000


def few_samples_note(n_samples: int | None, n: int, split: str,
                     what: str = "IBA's feature statistics",
                     names: dict[str, str] | None = None) -> None:
    """One note when the default sample count (``n_samples`` None) found fewer than
    ``MIN_SAMPLES`` images (a small split); an explicit count is the user's choice."""
    from narrows.notes import note_once

    if n_samples is None and few_samples(n):
        flag = (names or {}).get("n_samples", "n_samples=N")
        note_once("few-samples", f"{what} use all {n:,} {split} images (≥ {MIN_SAMPLES:,} "
                  "advised): fine to try on a small data set, the noise model is just rougher; "
                  f"{flag} sets the count and silences this note")


def statistics_for(model: nn.Module, dataset: Any, normalizer: Any, path: str | Path,
                   options: Any = None, *, layer: str | None = None,
                   statistics: str | None = None, n_samples: int | None = None,
                   kind: Kind | None = None, batch_size: int | None = None, seed: int = 0, device: Any = None, split: str = "train",
                   re_estimate: bool = False, log: Any = print, stale_fix: str = "delete it, "
                   "or give another path", names: dict[str, str] | None = None
                   ) -> FeatureStatistics:
    """The statistics file ``statistics`` if given, else ``path`` if it exists, else estimated
    on up to ``n_samples`` (default 10,000) shuffled images of ``dataset`` (the ``split`` named
    in messages) and saved into ``path``. ``normalizer`` maps the data set's images to model
    inputs. A ``path`` estimated on other weights is refused (``stale_fix`` says what to do),
    or with ``re_estimate`` (models drawn anew on every run) estimated again.

    ``options`` (a :class:`~narrows.attribution.options.StatisticsOptions` or a command's
    config) gives ``layer``, ``statistics``, ``n_samples``, ``kind`` and ``batch_size`` where
    they are left None; the rest default as ``narrows attribution stats`` does. ``names`` maps
    option names to the flags messages should show (``{"n_samples": "--n-samples N"}``)."""
    from narrows.attribution.layers import default_layer
    from narrows.attribution.options import IBAOptions, LayerOption, StatisticsOptions, pick

    given = pick(options, StatisticsOptions, n_samples=n_samples, kind=kind,
                 batch_size=batch_size)
    n_samples, kind, batch_size = given["n_samples"], given["kind"], given["batch_size"]
    layer = pick(options, LayerOption, layer=layer)["layer"]
    statistics = pick(options, IBAOptions, statistics=statistics)["statistics"]

    if statistics:
        return FeatureStatistics.load(statistics)
    path = Path(path)
    if path.is_file():
        cached = FeatureStatistics.load(path)
        if cached.matches(model):  # the weights are hashed once
            return cached
        if not re_estimate:
            cached.check_model(model, str(path), stale_fix)  # refuses, naming the file
    count = n_samples if n_samples is not None else DEFAULT_N_SAMPLES
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    name = layer or default_layer(model)
    log(f"estimating feature statistics of '{name}' on {min(count, len(dataset)):,} {split} "
        f"images ({len(dataset):,} available)")
    batches = (normalizer(x.to(device)) for x, _ in loader)
    stats = estimate_statistics(model.to(device), name, batches, count, device=device,
                                kind=kind, warn=False)
    few_samples_note(n_samples, stats.n, split, names=names)
    stats.save(path)
    return stats
