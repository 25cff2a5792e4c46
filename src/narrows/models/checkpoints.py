"""Reading and writing checkpoint files (torch pickles and safetensors), never executing code.

The narrows torch format is ``{"state_dict": ..., "narrows_card": card.to_dict(), **extra}``;
in ``.safetensors`` files the card is JSON under the metadata key ``narrows_card``. Files from
other tools are accepted when their tensors sit at the top level or under one of the usual
wrapper keys (``state_dict``, ``model``, ``model_state_dict``, ``teacher``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from narrows.errors import UserError
from narrows.models.card import ModelCard
from narrows.runs.files import atomic_torch_save, atomic_write_bytes

TORCH_SUFFIXES = (".pth", ".pt", ".th", ".tar", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
CARD_KEY = "narrows_card"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "teacher")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")

StateDict = dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    """A checkpoint's weights (prefixes stripped), its narrows card if any, and everything else.

    ``extra`` holds the other top-level entries (``epoch``, ``best_prec1``, ``optimizer``, ...) or,
    for safetensors files, the other metadata strings.
    """

    state_dict: StateDict
    card: ModelCard | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read the ``.pth/.pt/.th/.tar/.bin`` or ``.safetensors`` checkpoint at ``path`` onto the
    CPU: its state dict, model card (``None`` when it has none) and extra entries.

    Torch files are read with ``weights_only=True``. A missing, unreadable or unrecognised file
    is a :class:`UserError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise UserError(
            f"checkpoint {path} has an unknown suffix '{path.suffix}'",
            f"use a {', '.join(TORCH_SUFFIXES)} (torch) or {SAFETENSORS_SUFFIX} file",
        )
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"checkpoint {path} {what}", "check the path")
    if suffix == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    return _read_torch(path)


def _read_torch(path: Path) -> Checkpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        raise _unreadable(path, exc) from exc
    if not isinstance(obj, Mapping):
        raise UserError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights",
            "save the model's state_dict() instead",
        )
    obj = dict(obj)
    card_data = obj.pop(CARD_KEY, None)
    state_dict, extra = _unwrap(path, obj)
    card = None if card_data is None else _parse_card(path, card_data)
    return Checkpoint(_strip_prefixes(state_dict), card, extra)


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state_dict = load_file(path, device="cpu")
        with safe_open(path, framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise _unreadable(path, exc) from exc
    card = None
    if CARD_KEY in metadata:
        try:
            card_data = json.loads(metadata.pop(CARD_KEY))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"checkpoint {path} has a model card that is not JSON",
                "re-save the model with narrows, or pass --model and --num-classes instead",
            ) from exc
        card = _parse_card(path, card_data)
    metadata.pop("format", None)
    return Checkpoint(_strip_prefixes(state_dict), card, metadata)


def _unreadable(path: Path, exc: Exception) -> UserError:
    from narrows.runs.files import failure_reason

    return UserError(f"cannot read checkpoint {path}: {failure_reason(exc)}",
                     "re-save it holding only tensors, numbers, strings, lists and dicts, or "
                     "check that the file is complete")


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _unwrap(path: Path, obj: dict[str, Any]) -> tuple[StateDict, dict[str, Any]]:
    """Find the state dict in ``obj`` (top level or one or two wrapper levels down)."""
    if _is_state_dict(obj):
        return dict(obj), {}
    for key in WRAPPER_KEYS:
        value = obj.get(key)
        if _is_state_dict(value):
            return dict(value), {k: v for k, v in obj.items() if k != key}
        if isinstance(value, Mapping):  # e.g. {"model": {"state_dict": {...}}}
            for inner in WRAPPER_KEYS:
                if _is_state_dict(value.get(inner)):
                    extra = {k: v for k, v in obj.items() if k != key}
                    extra.update({k: v for k, v in value.items() if k != inner})
                    return dict(value[inner]), extra
    keys = ", ".join(map(str, list(obj)[:10])) + (", ..." if len(obj) > 10 else "")
    raise UserError(
        f"checkpoint {path} holds no state dict (its top-level keys: {keys or 'none'})",
        f"save the weights at the top level or under one of {', '.join(WRAPPER_KEYS)}",
    )


def _strip_prefixes(state_dict: StateDict) -> StateDict:
    """Remove ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) when every key has it."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def _parse_card(path: Path, data: Any) -> ModelCard:
    try:
        return ModelCard.from_dict(data)
    except UserError as exc:
        raise UserError(f"checkpoint {path}: {exc.what}", exc.fix) from exc


def save_model(
    path: str | Path, model: nn.Module, card: ModelCard, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights with its card to ``path``, atomically; the suffix picks the
    format. Returns ``path``.

    ``.safetensors`` files take no ``extra`` (a :class:`UserError` otherwise); any other suffix
    writes the narrows torch format, where ``extra`` holds tensors, numbers, strings, lists and
    dicts only, so that it reads back with ``weights_only=True``.
    """
    path = Path(path)
    extra = dict(extra or {})
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        if extra:
            raise UserError(
                f"cannot store {', '.join(map(str, extra))} in the safetensors file {path}",
                "save to a .pt file instead",
            )
        from safetensors.torch import save

        # Cloning breaks shared storage (tied weights), which safetensors refuses.
        tensors = {k: v.contiguous().clone() for k, v in state_dict.items()}
        metadata = {"format": "pt", CARD_KEY: json.dumps(card.to_dict())}
        return atomic_write_bytes(path, save(tensors, metadata=metadata))
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise UserError(
            f"cannot save a model to {path}: unknown suffix '{path.suffix}'",
            f"use .pt or {SAFETENSORS_SUFFIX}",
        )
    clash = {"state_dict", CARD_KEY} & set(extra)
    if clash:
        raise ValueError(f"extra must not use the reserved keys {sorted(clash)}")
    return atomic_torch_save(path, {"state_dict": state_dict, CARD_KEY: card.to_dict(), **extra})


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes, values): which weights a file that
    depends on them (IBA statistics, a readout) was made for."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
