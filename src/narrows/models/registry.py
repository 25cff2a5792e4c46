"""Model names: listing them, checking them, and building a model from one (never downloading)."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from narrows.errors import UserError

# Importing these registers narrows' own architectures with timm.
from narrows.models import cifar_alexnet as _cifar_alexnet  # noqa: F401
from narrows.models import cifar_resnet as _cifar_resnet  # noqa: F401
from narrows.models.strict import cfg_head_and_stem

NARROWS_MODELS: tuple[str, ...] = (
    "resnet20_cifar",
    "resnet32_cifar",
    "resnet44_cifar",
    "resnet56_cifar",
    "resnet110_cifar",
    "alexnet_cifar",
)


def list_models(pattern: str = "*") -> list[str]:
    """timm model names matching the shell-style ``pattern``, narrows' own first.

    A pattern without ``*``, ``?`` or ``[`` matches as a substring (``"vit"`` means ``"*vit*"``).
    """
    pattern = pattern.strip().lower() or "*"
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = timm.list_models(pattern)
    found = set(names)
    ours = [n for n in NARROWS_MODELS if n in found]
    return ours + [n for n in names if n not in NARROWS_MODELS]


def suggest(name: str, limit: int = 5) -> list[str]:
    """Registered names close to ``name``: those containing it first, then spelling neighbours."""
    query = name.strip().lower()
    names = list_models("*")
    containing = sorted(
        (n for n in names if query and query in n),
        key=lambda n: (n not in NARROWS_MODELS, not n.startswith(query), len(n)),
    )
    close = difflib.get_close_matches(query, names, n=limit, cutoff=0.6)
    return list(dict.fromkeys(containing[:limit] + close))[:limit]


def check_name(name: str) -> None:
    """Raise :class:`UserError` unless ``name`` (optionally ``arch.tag``) is a timm model."""
    if not isinstance(name, str) or not timm.is_model(name):
        close = suggest(str(name))
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown model '{name}'",
            f"{hint}list the names with: narrows models PATTERN",
        )
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError as exc:
            arch = timm.models.get_arch_name(name)
            raise UserError(
                f"unknown tag in model name '{name}'", f"use the plain name '{arch}'"
            ) from exc


def head_and_stem(name: str) -> tuple[str | None, str | None]:
    """Module names of the classifier and first conv of architecture ``name``, when timm knows them."""
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg_head_and_stem(None if cfg is None else cfg.to_dict())


def build(
    name: str, *, num_classes: int | None = None, in_chans: int | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)`` with bad options as :class:`UserError`.

    ``None`` arguments keep timm's defaults. ``pretrained=True`` is refused: narrows never downloads.
    """
    check_name(name)
    if kwargs.pop("pretrained", False):
        raise UserError(
            "narrows does not download pretrained weights",
            "load trained weights with --checkpoint PATH",
        )
    args = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_chans is not None:
        args["in_chans"] = in_chans
    try:
        return timm.create_model(name, pretrained=False, **args)
    except UserError:
        raise
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError) as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items()) or "default options"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"cannot build {name} with {shown}: {first}",
            "check the model options (see timm's documentation of this model)",
        ) from exc
