"""One-line notes that a command prints once, however often the situation recurs.

The set of notes already given belongs to one command run: :func:`narrows.cli.main` clears it
before each command, so a notebook or a test that runs several commands in one process sees
each command's notes. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import os

_GIVEN: set[str] = set()


def note_once(key: str, text: str, *, prefix: str = "note") -> None:
    """Print ``<prefix>: text`` the first time ``key`` is noted in this command run."""
    if key in _GIVEN:
        return
    _GIVEN.add(key)
    if os.environ.get("RANK", "0") == "0":
        print(f"{prefix}: {text}")


def forget_notes() -> None:
    """Start a new command run: every note may be given again."""
    _GIVEN.clear()
