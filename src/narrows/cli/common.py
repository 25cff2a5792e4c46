"""What every command does with a library error: name its parameters as flags."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def as_flags(text: str) -> str:
    """Library text with its parameter names in backticks (```dim_key```) as flags
    (``--dim-key``)."""
    import re

    from narrows.config import flag_name

    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag_name(m.group(1)), text)


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Re-raise a library :class:`UserError` with its parameter names as flags."""
    from narrows.errors import UserError

    try:
        yield
    except UserError as exc:
        raise UserError(as_flags(exc.what), as_flags(exc.fix)) from None
