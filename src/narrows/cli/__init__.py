"""``narrows``: the command line. Parses, calls the API, prints, exits.

User mistakes print ``error: <what> — <fix>`` on one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code instead of exiting (for tests and embedding)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub from the CLI
    from narrows.cli.app import UsageError, parse
    from narrows.cli.preflight import check
    from narrows.errors import UserError
    from narrows.notes import forget_notes

    try:
        command, cfg = parse(argv)
        forget_notes()  # each command run gives its own notes once
        check(cfg)  # before torch is imported: a mistake is answered at once
        return command.run(cfg)
    except (UserError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted — rerun the same command to resume where it stopped", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
