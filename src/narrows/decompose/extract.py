"""Extraction: one streamed forward pass over a data set fills the per-class histograms.

Nothing of size ``N×D`` is kept: each batch's pooled responses are counted and dropped. With a
``resume`` file the counts so far are saved every ``save_every`` batches, and a restarted run
continues after the last saved batch (the order is fixed: no shuffling, no augmentation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from narrows.data.streaming import Say, Streaming, stream_dataset
from narrows.decompose.extraction import Extraction
from narrows.decompose.histogram import TopKHistogram
from narrows.decompose.parts import Features, split_head
from narrows.errors import UserError
from narrows.models.layers import get_layer, run_to

DEFAULT_THRESHOLDS = (0.5, 0.75, 0.9)


def features_at(model: nn.Module, layer: str | None = None) -> Features:
    """A function ``x -> (N, D)`` of ``model``: the pooled pre-head features, or the output of
    the module named ``layer`` averaged over its spatial dimensions (the forward stops at that
    module).

    An unknown module name or an output that is neither ``(N, D)`` nor ``(N, D, H, W)`` is a
    :class:`UserError`.
    """
    if not layer:
        return split_head(model)[0]
    try:
        module = get_layer(model, layer)
    except UserError as err:
        raise UserError(f"{type(model).__name__} has no module '{layer}'", err.fix) from None

    def features(x: Tensor) -> Tensor:
        out = run_to(model, module, x, output=True)
        if out is None:
            raise UserError(f"{type(model).__name__}'s forward pass never calls '{layer}'",
                            "choose a module the forward pass runs, or leave --layer empty")
        if out.ndim == 4:
            return out.mean(dim=(2, 3))
        if out.ndim == 2:
            return out
        raise UserError(
            f"module '{layer}' gives outputs of shape {tuple(out.shape)}, not (N, D, H, W) or (N, D)",
            "choose a convolutional block or leave --layer empty",
        )

    return features


def curve_ks(num_channels: int) -> list[int]:
    """A default grid of k from 1 to D = ``num_channels``: 1, 2, 3, 5, 10, 20, 50, ..., the
    powers of two, and D itself."""
    grid = {1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000}
    grid |= {2**p for p in range(num_channels.bit_length())}
    return sorted(k for k in grid | {num_channels} if k <= num_channels)


def plain_split(data: Any, split: str = "train") -> Any:
    """``data`` itself when it is a data set; a data bundle's ``split`` without augmentation
    (counting on augmented images would count other images than the command does)."""
    return data.split(split, "none") if hasattr(data, "split") and hasattr(data, "info") else data


def extract(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    k: int | None = None,
    k_img: int | None = None,
    ks: Sequence[int] | None = None,
    fraction: float | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    layer: str | None = None,
    normalizer: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = True,
    resume: str | Path | None = None,
    save_every: int = 200,
    say: Say | None = None,
    meta: dict[str, Any] | None = None,
) -> Extraction:
    """Count the histograms of ``model``'s pooled responses over ``dataset`` (eval mode).

    The indices are each class's ``k`` most frequent channels among its images' top ``k_img``
    (default ``k``) positive responses. ``ks`` are further per-image k counted in the same pass
    (for accuracy-vs-k curves; default :func:`curve_ks`, as ``narrows decompose extract``);
    ``thresholds`` the mass fractions of Ψ. ``dataset`` yields ``(image in [0, 1], label)``, or
    is a data bundle, whose train split is used without augmentation (as the command does);
    ``normalizer`` maps a batch to model inputs; ``num_classes`` is the classifier's class
    count. ``layer`` names the module whose pooled output is read (default: the pre-head
    features, see :func:`features_at`). With ``fraction`` instead of ``k``, variant A
    (:func:`extract_fractional`) is counted. With ``resume`` (a file path), the counts so far
    are saved there every ``save_every`` batches and picked up on the next call; the file is
    removed when done. ``meta`` is added to the extraction's metadata.
    """
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise UserError(f"the fraction must lie in (0, 1), got {fraction}", "pass e.g. 0.5")
    if fraction is None and k is None:
        raise UserError("extract needs k (channels per class) or a fraction",
                        "pass e.g. k=5, or fraction=0.5")
    dataset = plain_split(dataset)
    device = torch.device(device)
    features = features_at(model, layer)
    width = _width(model, features, dataset, normalizer, device)
    how = Streaming(device, batch_size, workers, progress, say, resume, save_every)
    info = {"layer": layer or "pre_logits", **(meta or {})}
    if fraction is not None:
        return _fractional(model, features, dataset, width, fraction, num_classes, thresholds,
                           normalizer, how, info)
    assert k is not None
    k_img = k if k_img is None else k_img
    for name, value in (("k", k), ("k_img", k_img)):
        if not 1 <= value <= width:
            raise UserError(f"{name} must lie in [1, {width}], got {value}", f"pass a valid {name}")
    ks = curve_ks(width) if ks is None else ks
    hist = TopKHistogram(num_classes, width, {k_img, *[x for x in ks if 1 <= x <= width]},
                         k_mass=k, thresholds=thresholds, device=device)
    count(model, features, dataset, hist, normalizer, how)
    info = {"layer": info["layer"], "images_seen": int(hist.images.sum()), **(meta or {})}
    return Extraction.from_state(hist.state_dict(), k, k_img, info)


def extract_fractional(
    model: nn.Module, dataset: Dataset, fraction: float, *, num_classes: int, **options: Any
) -> Extraction:
    """Variant A (see :meth:`Extraction.fractional_indices`) of ``model`` over ``dataset``
    (``num_classes`` classes) at mass ``fraction`` in (0, 1): two passes, the first for each
    class's ``k_c``, the second for the histograms at those ``k_c``. ``options`` are the
    keywords of :func:`extract` from ``thresholds`` on (``thresholds``, ``layer``,
    ``normalizer``, ``device``, ``batch_size``, ``workers``, ``progress``, ``resume``,
    ``save_every``, ``say``, ``meta``)."""
    return extract(model, dataset, num_classes=num_classes, fraction=fraction, **options)


def _fractional(
    model: nn.Module,
    features: Features,
    dataset: Dataset,
    width: int,
    fraction: float,
    num_classes: int,
    thresholds: Sequence[float],
    normalizer: Callable[[Tensor], Tensor] | None,
    how: Streaming,
    info: dict[str, Any],
) -> Extraction:
    """The two passes of :func:`extract_fractional`."""
    levels = sorted({fraction, *thresholds})
    first = TopKHistogram(num_classes, width, [1], thresholds=levels, device=how.device)
    partial = Path(how.resume) if how.resume else None
    count(model, features, dataset, first, normalizer,
          replace(how, resume=partial and partial.with_suffix(".pass1.pt")),
          desc="extract (pass 1/2)")
    probe = Extraction.from_state(first.state_dict(), 1, 1)
    per_class = probe.fractional_k(fraction)
    second = TopKHistogram(num_classes, width, per_class, k_mass=max(per_class),
                           thresholds=levels, device=how.device)
    count(model, features, dataset, second, normalizer, how, desc="extract (pass 2/2)")
    layer, extra = info["layer"], {key: v for key, v in info.items() if key != "layer"}
    info = {"layer": layer, "fraction": fraction, "k_per_class": per_class,
            "images_seen": int(second.images.sum()), **extra}
    kmax = max(per_class)
    return Extraction.from_state(second.state_dict(), kmax, kmax, info)


@torch.no_grad()
def _width(
    model: nn.Module,
    features: Features,
    dataset: Dataset,
    normalizer: Callable[[Tensor], Tensor] | None,
    device: torch.device,
) -> int:
    """``D``: the width of the features, from one image (eval mode)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise UserError("the data set is empty", "choose another split or data spec")
    model.eval().to(device)
    image = dataset[0][0][None].to(device)
    out = features(normalizer(image) if normalizer else image)
    return int(out.shape[1])


@torch.no_grad()
def count(model: nn.Module, features: Features, dataset: Dataset, hist: TopKHistogram,
          normalizer: Callable[[Tensor], Tensor] | None, how: Streaming,
          desc: str = "extract") -> TopKHistogram:
    """Feed ``dataset`` (in order, ``model`` in eval mode) through ``normalizer`` (if any) and
    ``features`` into ``hist``; ``how`` says where, in which batches, and the partial file a
    killed call resumes from; ``desc`` names the pass in its bar."""
    model.eval().to(how.device)

    def step(images: Tensor, labels: Tensor) -> None:
        hist.update(features(normalizer(images) if normalizer else images), labels)

    stream_dataset(dataset, step, hist, how, desc=desc)
    return hist
