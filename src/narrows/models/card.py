"""The model card: everything needed to rebuild a saved model and feed it data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from narrows.errors import UserError

_FIX = "re-save the model with narrows, or pass --model and --num-classes instead"


@dataclass(frozen=True)
class ModelCard:
    """How a checkpoint's model was built and which inputs it expects.

    ``architecture`` is a timm model name, or a user model as ``/absolute/file.py:ClassName`` or
    ``package.module:ClassName``; ``input_size`` the side of the square input in pixels;
    ``mean``/``std`` the per-channel normalisation of inputs in [0, 1] (one value per input
    channel); ``class_names`` has ``num_classes`` entries when known; ``data_spec`` is the narrows
    data spec the model was trained on. ``model_kwargs`` are further JSON-serialisable arguments
    of ``timm.create_model`` (or of the user's class): ``img_size`` of a fixed-size model trained
    at another size, ``--model-kwargs`` (``patch_size``, ``drop_rate``, ...).
    Invalid values raise :class:`UserError`.
    """

    architecture: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None
    data_spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.architecture, str) or not self.architecture:
            _bad("architecture must be a non-empty string", self.architecture)
        for key, minimum in (("num_classes", 0), ("in_chans", 1), ("input_size", 1)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                _bad(f"{key} must be an integer >= {minimum}", value)
        for key in ("mean", "std"):
            value = _floats(key, getattr(self, key))
            if len(value) != self.in_chans:
                _bad(f"{key} needs {self.in_chans} values (one per input channel)", list(value))
            set_(self, key, value)
        if any(s <= 0 for s in self.std):
            _bad("std values must be positive", list(self.std))
        if self.class_names is not None:
            names = self.class_names
            if isinstance(names, str) or not all(isinstance(n, str) for n in names):
                _bad("class_names must be a list of strings", names)
            names = tuple(names)
            if len(names) != self.num_classes:
                _bad(f"class_names has {len(names)} names for {self.num_classes} classes", "")
            set_(self, "class_names", names)
        if self.data_spec is not None and not isinstance(self.data_spec, str):
            _bad("data_spec must be a string", self.data_spec)
        if not isinstance(self.model_kwargs, dict):
            _bad("model_kwargs must be a mapping", self.model_kwargs)
        try:
            json.dumps(self.model_kwargs)
        except (TypeError, ValueError):
            _bad("model_kwargs must be JSON-serialisable", self.model_kwargs)
        set_(self, "model_kwargs", dict(self.model_kwargs))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); :meth:`from_dict` reads it back."""
        return {
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": None if self.class_names is None else list(self.class_names),
            "data_spec": self.data_spec,
            "model_kwargs": dict(self.model_kwargs),
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Build a card from :meth:`to_dict` output; missing or unknown keys are a :class:`UserError`.

        ``class_names``, ``data_spec`` and ``model_kwargs`` may be absent.
        """
        if not isinstance(data, dict):
            raise UserError(f"model card must be a mapping, got {type(data).__name__}", _FIX)
        names = [f.name for f in fields(cls)]
        optional = {"class_names", "data_spec", "model_kwargs"}
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data and n not in optional]
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if unknown:
                parts.append(f"unknown {', '.join(map(str, unknown))}")
            raise UserError(f"invalid model card: {'; '.join(parts)}", _FIX)
        data = dict(data)
        if data.get("model_kwargs") is None:
            data.pop("model_kwargs", None)
        return cls(**data)


def _floats(key: str, value: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        _bad(f"{key} must be a list of numbers", value)
    return out


def _bad(problem: str, value: Any) -> NoReturn:
    shown = f" (got {value!r})" if value != "" else ""
    raise UserError(f"invalid model card: {problem}{shown}", _FIX)
