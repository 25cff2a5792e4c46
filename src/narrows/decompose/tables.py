"""Plain-text tables of the decompose results: Markdown and CSV, through the core's one table
writer (:mod:`narrows.runs.tables`)."""

from __future__ import annotations

from narrows.runs.tables import csv_text, markdown_text

__all__ = ["csv_text", "markdown"]


def markdown(columns: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of ``rows`` (cells already formatted, as text) under ``columns``."""
    return markdown_text([dict(zip(columns, row, strict=True)) for row in rows], columns)
