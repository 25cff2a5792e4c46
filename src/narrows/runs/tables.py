"""One table writer: rows of dicts as CSV (for pandas) and Markdown (for the terminal and docs).

Every table of every command goes through here, so numbers and missing values read the same
everywhere: CSV keeps six significant digits and writes a missing number or NaN as ``nan``
(``pandas.read_csv`` reads it back as NaN); Markdown shows four significant digits (whole
numbers with thousands separators from 1,000, scientific notation from 100,000 and below
0.001) and ``—`` for a missing value. Columns are the union of the rows' keys
in first-seen order unless given.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MISSING_MARKDOWN = "—"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or (
        hasattr(value, "item") and hasattr(value, "dtype"))


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and hasattr(value, "dtype") else value


def csv_cell(value: Any) -> str:
    """A value as CSV text: six significant digits, ``nan`` for a missing or non-finite number."""
    value = _scalar(value)
    if value is None:
        return "nan"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) or math.isinf(value) else "nan"
    return str(value)


def markdown_cell(value: Any) -> str:
    """A value as Markdown text: four significant digits, ``—`` for a missing number."""
    value = _scalar(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING_MARKDOWN
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value).replace("|", "\\|")


def columns_of(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> list[str]:
    """``columns``, or the rows' keys in first-seen order."""
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """The rows as CSV with a header line (a row lacking a column gets ``nan``)."""
    names = columns_of(rows, columns)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow([csv_cell(row.get(name)) for name in names])
    return buffer.getvalue()


def markdown_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """The rows as a Markdown table (numbers right-aligned)."""
    names = columns_of(rows, columns)
    if not names:
        return ""
    numeric = [all(_is_number(row.get(n)) or row.get(n) is None for row in rows) and
               any(_is_number(row.get(n)) for row in rows) for n in names]
    lines = ["| " + " | ".join(names) + " |",
             "|" + "|".join("---:" if num else "---" for num in numeric) + "|"]
    lines += ["| " + " | ".join(markdown_cell(row.get(n)) for n in names) + " |" for row in rows]
    return "\n".join(lines) + "\n"
