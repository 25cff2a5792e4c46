"""Strict weight loading that says exactly which keys and shapes do not fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from narrows.errors import UserError

MAX_LISTED = 10


def model_name(model: nn.Module) -> str:
    """The timm architecture name of ``model`` if it carries one, else its class name."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return str(cfg["architecture"])
    return type(model).__name__


def format_shape(shape: Sequence[int]) -> str:
    return "×".join(str(s) for s in shape) if len(shape) else "scalar"


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def cfg_head_and_stem(cfg: Any) -> tuple[str | None, str | None]:
    """Module names of the classifier and first conv in a timm ``pretrained_cfg`` mapping.

    timm may give a tuple of names (e.g. distilled heads); the first is used.
    """
    if not isinstance(cfg, Mapping):
        return None, None
    names = []
    for key in ("classifier", "first_conv"):
        value = cfg.get(key)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        names.append(value if isinstance(value, str) and value else None)
    return names[0], names[1]


def mismatch_report(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Missing keys, unexpected keys and ``(key, checkpoint shape, model shape)`` mis-shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    return missing, unexpected, misshaped


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    *,
    name: str | None = None,
) -> None:
    """Load ``state_dict`` into ``model`` with ``strict=True``, after checking keys and shapes.

    Any missing, unexpected or mis-shaped key raises a :class:`UserError` naming them (at most
    ten of each, with shapes) and ``source`` (the checkpoint path, for the message). ``name`` is
    the architecture named in the message (default: the model's timm name or class).
    """
    missing, unexpected, misshaped = mismatch_report(model, state_dict)
    name = name or model_name(model)
    if missing or unexpected or misshaped:
        parts = []
        if misshaped:
            shapes = [
                f"{k} (checkpoint {format_shape(c)}, model {format_shape(m)})"
                for k, c, m in misshaped
            ]
            parts.append(f"mis-shaped {_listing(shapes)}")
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        raise UserError(
            f"checkpoint {source} does not fit {name}: {'; '.join(parts)}",
            _fix(model, misshaped, bool(missing or unexpected)),
        )
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:  # pragma: no cover - keys and shapes were checked above
        raise UserError(f"checkpoint {source} does not fit {name}: {exc}", "") from exc


def _fix(
    model: nn.Module,
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    keys_differ: bool,
) -> str:
    head, stem = cfg_head_and_stem(getattr(model, "pretrained_cfg", None))
    hints = []
    for key, ckpt_shape, model_shape in misshaped:
        if head and key == f"{head}.weight" and ckpt_shape[:1] != model_shape[:1]:
            hints.append(
                f"pass the --num-classes the checkpoint was trained with ({ckpt_shape[0]})"
            )
        if stem and key == f"{stem}.weight" and ckpt_shape[1:2] != model_shape[1:2]:
            hints.append(f"pass the --in-chans the checkpoint was trained with ({ckpt_shape[1]})")
    if keys_differ or not hints:
        hints.append("pass the --model the checkpoint was trained with")
    return "; ".join(dict.fromkeys(hints))
