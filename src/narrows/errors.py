"""User-facing errors: one line saying what is wrong and how to fix it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad option, missing file, mismatched checkpoint).

    The command line prints ``error: <what> — <fix>`` and exits with code 2, without a
    traceback. Library callers can catch it like any exception.
    """

    exit_code = 2

    def __init__(self, what: str, fix: str = "") -> None:
        self.what = what.strip()
        self.fix = fix.strip()
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.what} — {self.fix}" if self.fix else self.what


class MissingExtraError(UserError):
    """An optional dependency is needed; names the extra that provides it."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional package '{package}'",
            f"install it with: pip install 'narrows[{extra}]'",
        )


def optional_import(module: str, *, extra: str, feature: str):
    """Import an optional dependency, or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module.split(".")[0], extra, feature) from exc
