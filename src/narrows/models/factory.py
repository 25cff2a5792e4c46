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
from narrows.models.decomposed import adopt_decomposed_head, decomposed_sizes
from narrows.models.registry import (
    build,
    canonical_name,
    check_name,
    head_and_stem,
    is_custom,
    parse_custom,
)
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
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Rebuild a model from ``checkpoint`` and load its weights strictly.

    A checkpoint with a narrows card is rebuilt from the card alone (its ``model_kwargs``
    included, e.g. a ViT's ``img_size``); ``name``, ``num_classes``, ``in_chans`` or
    ``model_kwargs`` that contradict it are a :class:`UserError`. Other checkpoints need
    ``name``; ``num_classes`` and ``in_chans`` are then read from the classifier and first-conv
    weights when not given. A card naming a user's ``file.py:Class`` imports that file (a note
    says so); ``name`` may point to the same class elsewhere when the file has moved.
    """
    return _from_checkpoint(
        read_checkpoint(checkpoint), str(checkpoint), name, num_classes, in_chans, model_kwargs
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
        arch = _rebuild_name(card.architecture, name, source)
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
        arch = canonical_name(name)
        inferred_classes, inferred_chans = infer_sizes(name, ckpt.state_dict)
        model = build(
            name,
            num_classes=num_classes if num_classes is not None else inferred_classes,
            in_chans=in_chans if in_chans is not None else inferred_chans,
            **kwargs,
        )
    adopt_decomposed_head(model, ckpt.state_dict, source)  # a 'decompose finetune' checkpoint
    load_state_dict_strict(model, ckpt.state_dict, source, name=arch)
    check_finite(model, source)
    model.eval()
    return LoadedModel(model, card, ckpt.extra)


def first_nonfinite(model: nn.Module) -> tuple[str, str] | None:
    """``(name, "NaN" or "infinite")`` of the first parameter or buffer of ``model`` holding a
    NaN or infinite value, ``None`` when every floating-point tensor is finite."""
    for key, tensor in model.state_dict().items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        if not bool(torch.isfinite(tensor).all()):
            return key, "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
    return None


def check_finite(model: nn.Module, source: str) -> None:
    """Raise :class:`UserError` when the weights loaded from ``source`` hold NaN or infinity
    (a diverged training run): no analysis of such a model means anything."""
    bad = first_nonfinite(model)
    if bad is not None:
        raise UserError(
            f"checkpoint {source} holds {bad[1]} weights (first in '{bad[0]}'): the training "
            "that wrote it diverged",
            "use a checkpoint from before it diverged, or train again with a lower --lr",
        )


def infer_sizes(name: str, state_dict: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """``(num_classes, in_chans)`` of architecture ``name``, read from the classifier and
    first-conv weights in ``state_dict``; ``None`` if unknown."""
    head, stem = head_and_stem(name)
    num_classes = in_chans = None
    if is_custom(name):  # no timm config: the last matrix is the classifier, the first conv the stem
        matrices = [v for v in state_dict.values() if v.ndim == 2]
        convs = [v for v in state_dict.values() if v.ndim == 4]
        return (int(matrices[-1].shape[0]) if matrices else None,
                int(convs[0].shape[1]) if convs else None)
    head_weight = state_dict.get(f"{head}.weight") if head else None
    if head_weight is not None and head_weight.ndim >= 1:
        num_classes = int(head_weight.shape[0])
    else:
        num_classes = decomposed_sizes(state_dict, head)
    stem_weight = state_dict.get(f"{stem}.weight") if stem else None
    if stem_weight is not None and stem_weight.ndim == 4:
        in_chans = int(stem_weight.shape[1])
    return num_classes, in_chans


def _same_arch(a: str, b: str) -> bool:
    if a == b:
        return True
    custom_a, custom_b = parse_custom(a), parse_custom(b)
    if custom_a is not None or custom_b is not None:
        # the same class, possibly from a file that has moved since the checkpoint was saved
        return (custom_a is not None and custom_b is not None
                and custom_a.attribute == custom_b.attribute)
    return timm.models.get_arch_name(a) == timm.models.get_arch_name(b)


def _rebuild_name(saved: str, given: str | None, source: str) -> str:
    """The architecture to build for a card naming ``saved``: a user model given again with
    ``--model`` (the same class, maybe moved) is taken from there; a file is noted once."""
    custom = parse_custom(saved)
    if custom is None:
        return saved
    name = canonical_name(given) if given is not None and is_custom(given) else saved
    used = parse_custom(name)
    if used is not None and used.is_file:
        path = Path(used.source)
        if not path.is_file():
            raise UserError(
                f"checkpoint {source} was saved from the model class {used.attribute} in "
                f"{path}, which does not exist",
                f"put the file back, or pass --model path/to/file.py:{used.attribute}",
            )
        from narrows.notes import note_once

        note_once(f"import:{name}", f"importing {path} to rebuild {used.attribute} (named by "
                  f"the card of {source}); its code runs as Python")
    return name


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


def create_for_input(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int,
    model_kwargs: dict[str, Any] | None = None,
    data: str = "the data",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``name`` for ``image_size``-pixel inputs of ``in_chans`` channels and check that it
    runs on them; ``data`` names the data in error messages.

    Models built for one input size (ViTs, ...) get ``img_size=image_size`` unless
    ``model_kwargs`` sets it; one zero image goes through the model (eval mode, no gradients)
    and the logits must have ``num_classes`` columns. Returns the model (in train mode) and the
    kwargs it was built with, for the card. A model that cannot take the size or gives the wrong
    outputs is a :class:`UserError`; nothing is written.
    """
    from narrows.models.inputs import size_kwargs

    given = dict(model_kwargs or {})
    kwargs = {**size_kwargs(name, image_size), **given}
    model = build(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    problem = _forward_problem(model, in_chans, image_size, num_classes)
    if problem is not None and "img_size" not in kwargs and not is_custom(name):
        # not a fixed-size model by timm's config, but it may still take the size
        try:
            retry = build(name, num_classes=num_classes, in_chans=in_chans,
                          **{**kwargs, "img_size": image_size})
        except UserError:
            retry = None
        if retry is not None and _forward_problem(retry, in_chans, image_size, num_classes) is None:
            model, kwargs, problem = retry, {**kwargs, "img_size": image_size}, None
    if problem is not None:
        _refuse(problem, name, image_size, num_classes, data, "img_size" in kwargs)
    model.train()
    return model, kwargs


def check_runs_on(
    model: nn.Module,
    name: str,
    *,
    in_chans: int,
    image_size: int,
    num_classes: int,
    data: str = "the data",
    took_size: bool = False,
) -> None:
    """Raise :class:`UserError` unless one zero ``image_size`` image runs through ``model``
    (architecture ``name``) to ``num_classes`` logits; ``took_size``: it was built with
    ``img_size``. The model's train/eval mode is kept."""
    problem = _forward_problem(model, in_chans, image_size, num_classes)
    if problem is not None:
        _refuse(problem, name, image_size, num_classes, data, took_size)


def _refuse(problem: tuple[str, bool], name: str, image_size: int, num_classes: int, data: str,
            took_size: bool) -> None:
    what, shape_problem = problem
    custom = parse_custom(name)
    shown = custom.attribute if custom is not None else name
    if shape_problem:
        raise UserError(
            f"{shown} gives {what} for {data}, which has {num_classes} classes",
            "make the model's last layer output one logit per class (its constructor "
            "gets num_classes= when it takes it)",
        )
    raise UserError(
        f"{shown} cannot run on {image_size}×{image_size} images ({data}): {what}",
        _size_fix(name, image_size, took_size),
    )


def run_zero_image(model: nn.Module, in_chans: int, size: int) -> tuple[Any, str | None]:
    """Run one zero ``size×size`` image through ``model`` (eval mode, no gradients, on the
    model's device; its mode is restored): ``(output, None)``, or ``(None, the error's first
    line)`` when the model cannot take the input."""
    try:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, in_chans, size, size, device=device, dtype=dtype)), None
    except Exception as exc:  # any failure means the same: the model cannot take this input
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    finally:
        model.train(was_training)


def _forward_problem(
    model: nn.Module, in_chans: int, size: int, num_classes: int
) -> tuple[str, bool] | None:
    """``None`` when one zero image runs through ``model`` to ``num_classes`` logits, else
    ``(what went wrong, whether it is the output shape)``."""
    out, error = run_zero_image(model, in_chans, size)
    if error is not None:
        return error, False
    if not isinstance(out, torch.Tensor):
        return f"a {type(out).__name__} instead of a tensor of logits", True
    if out.ndim != 2 or out.shape != (1, num_classes):
        return f"outputs of shape {tuple(out.shape)} for one image", True
    return None


def _size_fix(name: str, size: int, took_size: bool) -> str:
    default = None
    if not is_custom(name):
        cfg = timm.models.get_pretrained_cfg(name)
        shape = getattr(cfg, "input_size", None) if cfg is not None else None
        default = int(shape[-1]) if shape else None
    if took_size:
        return ("use larger images (--image-size for folder:/imagenet: data), or other model "
                "options (--model-kwargs, e.g. patch_size=...)")
    sized = f" (it is made for {default} px)" if default and default != size else ""
    return (f"serve the images at a size the model takes{sized} with --image-size, or pass "
            "the options it needs with --model-kwargs key=value,...")
