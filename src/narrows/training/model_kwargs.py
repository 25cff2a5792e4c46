"""Model constructor arguments given as text (``--model-kwargs drop_rate=0.1,patch_size=8``)."""

from __future__ import annotations

import json
from typing import Any

RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained", "checkpoint_path")
MODEL_KWARGS_EXAMPLE = "e.g. --model-kwargs drop_rate=0.1,patch_size=8"


def _split_items(text: str) -> list[str]:
    """Split ``text`` at commas outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _scalar(text: str) -> Any:
    """A JSON value where ``text`` is one (``64``, ``0.1``, ``true``, ``[8, 8]``), else the text."""
    words = {"True": True, "False": False, "None": None}
    if text in words:
        return words[text]
    try:
        return json.loads(text)
    except ValueError:
        return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "'" else text


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """``key=value,...`` → a dict; values are JSON scalars (or lists) where they parse, else
    strings. A malformed item, a repeated key or one narrows sets itself is a :class:`UserError`."""
    from narrows.errors import UserError

    out: dict[str, Any] = {}
    for item in _split_items(text or ""):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--model-kwargs item '{item}' is not key=value",
                            f"write comma-separated key=value pairs, {MODEL_KWARGS_EXAMPLE}")
        if key in out:
            raise UserError(f"--model-kwargs gives {key} twice", f"give {key} once")
        if key in RESERVED_KWARGS:
            raise UserError(f"--model-kwargs cannot set {key}",
                            "narrows sets it (classes and channels come from the data; weights "
                            "from --checkpoint)")
        out[key] = _scalar(value.strip())
    return out


def check_model_kwargs(text: str | None) -> str | None:
    """What is wrong with ``text`` (see :func:`parse_model_kwargs`), or ``None``."""
    from narrows.errors import UserError

    try:
        parse_model_kwargs(text)
    except UserError as exc:
        return str(exc.what)
    return None
