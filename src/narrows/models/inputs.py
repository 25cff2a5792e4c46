"""Serving a model the inputs it was trained on: the card's size, normalisation and classes.

Every command that analyses a saved model reads its data through :func:`data_for_model`, so the
checkpoint's card is the default everywhere: the input size (for file-backed data sets, which
can be served at any size), mean/std and class count. An explicit size that differs from the
card is allowed for networks that take it (CNNs: a note says so) and refused for fixed-size
models (ViTs built for one size) with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from narrows.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from narrows.data.base import DataBundle
    from narrows.models.card import ModelCard

RESIZABLE_KINDS = ("imagenet", "folder")  # data kinds served at any size


@dataclass(frozen=True)
class ServedData:
    """A data bundle with the normalisation the model expects."""

    bundle: DataBundle
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int


def accepts_input_size(model: nn.Module, size: int, in_chans: int) -> bool:
    """Whether ``model`` runs on ``size×size`` inputs (one zero image, no gradients).

    A timm ViT built for one size with a strict patch embedding is answered from its
    attributes; any other model is tried once (its train/eval mode is restored).
    """
    from narrows.models.factory import run_zero_image


    embed = getattr(model, "patch_embed", None)
    if embed is not None and not getattr(model, "dynamic_img_size", False):
        img_size = getattr(embed, "img_size", None)
        if getattr(embed, "strict_img_size", False) and img_size is not None:
            return tuple(img_size) == (size, size)
    return run_zero_image(model, in_chans, size)[1] is None


def _short(names: tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _check_class_names(card: ModelCard | None, names: tuple[str, ...] | None, spec: str,
                       what: str, say: Callable[[str], None]) -> None:
    """Compare the data's class names with the card's (case-insensitively; a card or data set
    without names is not checked). The same classes in another order would score output ``i``
    as another class: refused. Other names (wnids against words, another data set of the same
    size) may be deliberate: one warning line."""
    trained = tuple(card.class_names) if card is not None and card.class_names else None
    if not trained or not names or len(trained) != len(names):
        return
    if tuple(n.lower() for n in trained) == tuple(n.lower() for n in names):
        return
    source = f" ({card.data_spec})" if card is not None and card.data_spec else ""
    if sorted(n.lower() for n in trained) == sorted(n.lower() for n in names):
        raise UserError(f"{spec} lists the same classes as {what} in another order, so its "
                        "labels would be scored against the wrong outputs",
                        f"use the data set the model was trained on{source}")
    say(f"warning: {spec} has other class names ({_short(tuple(names))}) than {what} "
        f"({_short(trained)}); output i is scored as the data's class i")


def data_for_model(
    spec: str,
    card: ModelCard | None,
    model: nn.Module | None = None,
    *,
    image_size: int | None = None,
    download: bool = False,
    say: Callable[[str], None] = print,
    what: str = "the checkpoint",
) -> ServedData:
    """Load ``spec`` as ``model`` (described by ``card``) expects it.

    The served size defaults to the card's input size; ``image_size`` overrides it for data sets
    served at any size (``imagenet:``, ``folder:``). A size the model cannot take, a fixed-size
    data set at another size than a fixed-size model's, or a class-count mismatch is a
    :class:`UserError`; a CNN at another size than its card's gets a note through ``say``.
    """
    from narrows.data import load
    from narrows.data.specs import parse_spec

    kind = parse_spec(spec).kind
    trained = card.input_size if card is not None else None
    size = image_size if image_size is not None else trained
    bundle = load(spec, image_size=size if kind in RESIZABLE_KINDS else None, download=download)
    info = bundle.info
    served = info.image_size
    if image_size is not None and image_size != served:  # a data set of one fixed size
        raise UserError(f"{spec} is served at {served}×{served} px, not --image-size "
                        f"{image_size}", "drop --image-size (it applies to imagenet: and folder: "
                        "data)" + ("; shapes takes its size in the spec, e.g. shapes:size=64"
                                   if kind == "shapes" else ""))
    if card is not None and info.num_classes != card.num_classes:
        raise UserError(f"{what} predicts {card.num_classes} classes but {spec} has "
                        f"{info.num_classes}", "use the data set the model was trained on")
    _check_class_names(card, info.class_names, spec, what, say)
    if model is not None:
        classes = getattr(model, "num_classes", None)
        if isinstance(classes, int) and classes != info.num_classes:
            raise UserError(f"the model predicts {classes} classes but {spec} has "
                            f"{info.num_classes}", "use the data set the model was trained on")
    if trained is not None and served != trained:
        in_chans = card.in_chans if card is not None else info.in_chans
        if model is not None and not accepts_input_size(model, served, in_chans):
            how = ("drop --image-size" if image_size is not None
                   else f"serve {trained}-px images (another data spec)")
            raise UserError(f"{what} was built for {trained}×{trained} inputs and cannot take "
                            f"{served}×{served} ({spec})",
                            f"{how}, or train the model at {served} px")
        say(f"note: serving {spec} at {served}×{served} px; {what} was trained at "
            f"{trained}×{trained}")
    mean, std = ((card.mean, card.std) if card is not None else (info.mean, info.std))
    return ServedData(bundle, tuple(mean), tuple(std), served)


def size_kwargs(name: str, image_size: int) -> dict[str, int]:
    """``{"img_size": image_size}`` for a timm model built for one input size (its pretrained
    config says ``fixed_input_size``: ViTs, Swin, ``alexnet_cifar``) when that size is not its
    default; ``{}`` for models that take any size (CNNs) or are already built for it."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown or file-based model: nothing to infer
        return {}
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return {}
    default = getattr(cfg, "input_size", None)
    if default is not None and tuple(default[-2:]) == (image_size, image_size):
        return {}
    return {"img_size": image_size}
