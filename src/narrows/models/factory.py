"""Building models, with or without weights from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from narrows.errors import UserError
from narrows.models.card import ModelCard
from narrows.models.checkpoints import Checkpoint, read_checkpoint
from narrows.models.registry import build, check_name, head_and_stem
from narrows.models.strict import load_state_dict_strict


@dataclass
class LoadedModel:
    """A model with its checkpoint's weights, in eval mode, on the CPU.

    ``card`` is the checkpoint's narrows card (``None`` for other checkpoints); ``extra`` holds
    the checkpoint's other entries (``epoch``, ``best_prec1``, ...).
    """

    model: nn.Module
    card: ModelCard | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def create(
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the timm model ``name`` (narrows' CIFAR models included), never downloading.

    With ``checkpoint`` the weights are loaded strictly, as :func:`load_model` does (a card in
    the checkpoint must agree with ``name``; without one, ``num_classes`` and ``in_chans`` default
    to the checkpoint's). Other ``kwargs`` go to ``timm.create_model``. An unknown name, bad
    option or unfit checkpoint raises :class:`UserError`.
    """
    if checkpoint is None:
        return build(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    loaded = _from_checkpoint(
        read_checkpoint(checkpoint), str(checkpoint), name, num_classes, in_chans, kwargs
    )
    return loaded.model


def load_model(
    checkpoint: str | Path,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
) -> LoadedModel:
    """Rebuild a model from ``checkpoint`` and load its weights strictly.

    A checkpoint with a narrows card is rebuilt from the card alone; ``name``, ``num_classes`` or
    ``in_chans`` that contradict it are a :class:`UserError`. Other checkpoints need ``name``;
    ``num_classes`` and ``in_chans`` are then read from the classifier and first-conv weights
    when not given.
    """
    return _from_checkpoint(
        read_checkpoint(checkpoint), str(checkpoint), name, num_classes, in_chans
    )


def _from_checkpoint(
    ckpt: Checkpoint,
    source: str,
    name: str | None,
    num_classes: int | None,
    in_chans: int | None,
    kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    kwargs = dict(kwargs or {})
    card = ckpt.card
    if card is not None:
        _check_agrees(card, source, name, num_classes, in_chans, kwargs)
        arch = card.architecture
        model = build(
            arch,
            num_classes=card.num_classes,
            in_chans=card.in_chans,
            **{**card.model_kwargs, **kwargs},
        )
    else:
        if name is None:
            raise UserError(
                f"checkpoint {source} has no narrows model card, so its architecture is unknown",
                "pass --model NAME (the architecture it was trained as, e.g. resnet20_cifar)",
            )
        check_name(name)
        arch = name
        inferred_classes, inferred_chans = infer_sizes(name, ckpt.state_dict)
        model = build(
            name,
            num_classes=num_classes if num_classes is not None else inferred_classes,
            in_chans=in_chans if in_chans is not None else inferred_chans,
            **kwargs,
        )
    load_state_dict_strict(model, ckpt.state_dict, source, name=arch)
    model.eval()
    return LoadedModel(model, card, ckpt.extra)


def infer_sizes(name: str, state_dict: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """``(num_classes, in_chans)`` read from the classifier and first-conv weights, ``None`` if unknown."""
    head, stem = head_and_stem(name)
    num_classes = in_chans = None
    head_weight = state_dict.get(f"{head}.weight") if head else None
    if head_weight is not None and head_weight.ndim >= 1:
        num_classes = int(head_weight.shape[0])
    stem_weight = state_dict.get(f"{stem}.weight") if stem else None
    if stem_weight is not None and stem_weight.ndim == 4:
        in_chans = int(stem_weight.shape[1])
    return num_classes, in_chans


def _same_arch(a: str, b: str) -> bool:
    return a == b or timm.models.get_arch_name(a) == timm.models.get_arch_name(b)


def _check_agrees(
    card: ModelCard,
    source: str,
    name: str | None,
    num_classes: int | None,
    in_chans: int | None,
    kwargs: dict[str, Any],
) -> None:
    """Raise :class:`UserError` when explicit options contradict the checkpoint's card."""
    given = [
        (
            "--model",
            name,
            card.architecture,
            name is not None and not _same_arch(name, card.architecture),
        ),
        (
            "--num-classes",
            num_classes,
            card.num_classes,
            num_classes not in (None, card.num_classes),
        ),
        ("--in-chans", in_chans, card.in_chans, in_chans not in (None, card.in_chans)),
    ]
    given += [
        (k, v, card.model_kwargs[k], v != card.model_kwargs[k])
        for k, v in kwargs.items()
        if k in card.model_kwargs
    ]
    for option, value, saved, differs in given:
        if differs:
            raise UserError(
                f"checkpoint {source} was saved with {option} {saved}, but {option} {value} was given",
                f"drop {option}: the checkpoint's card says how to rebuild the model",
            )
