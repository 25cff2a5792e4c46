"""Plain-text tables of the decompose results: Markdown and CSV."""

from __future__ import annotations

import csv
import io
from typing import Any


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of ``rows`` (cells already formatted) under ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV of flat records; the columns are every key, in order of first appearance."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
