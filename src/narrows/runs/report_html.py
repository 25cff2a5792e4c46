"""The HTML of a :class:`narrows.runs.report.Report`: one page, inline CSS, no script, no link
outside the page; every text escaped and every number formatted as the Markdown tables are
(:func:`narrows.runs.tables.markdown_cell`)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

from narrows.runs.tables import MISSING_MARKDOWN, markdown_cell

if TYPE_CHECKING:
    from narrows.runs.report import Figure, Report, RunPage, Table

MAX_SIDE_COLUMNS = 24  # results columns of a side-by-side table

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
h3 { margin-top: 1.8em; } h3 code { font-weight: normal; }
.meta, .note { color: #666; } .summary { font-weight: 600; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; text-align: center; }
figure { max-width: calc(100% - 1em); }
figure img { max-width: 100%; max-height: 900px; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
section.run { border-top: 1px solid #e4e4e4; }
"""


def render(report: Report, *, narrows_version: str) -> str:
    """The page of ``report``, naming the ``narrows_version`` that wrote it."""
    groups: dict[str, list[tuple[int, RunPage]]] = {}
    for number, run in enumerate(report.runs, 1):
        groups.setdefault(run.command, []).append((number, run))
    body = [f"<h1>{escape(report.title)}</h1>",
            f'<p class="meta">{_count(len(report.runs), "run")} of '
            f'{_count(len(groups), "command")}, {_count(report.n_figures, "figure")} · '
            f"generated {escape(report.generated)} by narrows {escape(narrows_version)}</p>",
            _contents(groups)]
    for command, runs in groups.items():
        body.append(f'<section class="command" id="{_command_id(command)}">'
                    f"<h2>{escape(command)} <span class=\"meta\">"
                    f"({_count(len(runs), 'run')})</span></h2>")
        if len(runs) > 1:
            body.append(_side_by_side(runs))
        body += [_run_section(number, run) for number, run in runs]
        body.append("</section>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(report.title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def run_id(number: int) -> str:
    """The anchor of the ``number``-th run (from 1) of a report."""
    return f"run-{number}"


def _command_id(command: str) -> str:
    return "command-" + re.sub(r"[^A-Za-z0-9_-]+", "-", command).strip("-")


def _contents(groups: dict[str, list[tuple[int, RunPage]]]) -> str:
    items = []
    for command, runs in groups.items():
        links = "".join(f'<li><a href="#{run_id(n)}">{escape(str(run.path))}</a>'
                        + (f' <span class="meta">— {escape(_short(run.summary, 160))}</span>'
                           if run.summary else "") + "</li>" for n, run in runs)
        items.append(f'<li><a href="#{_command_id(command)}">{escape(command)}</a>'
                     f"<ul>{links}</ul></li>")
    return f'<nav><h2>Contents</h2><ul>{"".join(items)}</ul></nav>'


# -- cells and tables --------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell_text(value: Any) -> str:
    """``value`` as the text of a table cell: numbers as Markdown tables write them, ``—`` for
    a missing one, lists and dicts as short JSON."""
    if value is None:
        return MISSING_MARKDOWN
    if _is_number(value):
        return markdown_cell(value)
    if isinstance(value, (list, tuple)) and all(_is_number(v) for v in value):
        return _short("[" + ", ".join(markdown_cell(v) for v in value) + "]", 120)
    if isinstance(value, (list, tuple, dict)):
        return _short(json.dumps(value, default=str), 120)
    return str(value)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _td(value: Any) -> str:
    css = ' class="num"' if _is_number(value) else ""
    return f"<td{css}>{escape(cell_text(value))}</td>"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], head: str = "") -> str:
    """An HTML table; ``head`` is an extra header row of raw HTML, drawn above the names."""
    names = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table><thead>{head}<tr>{names}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _key_values(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th>{_td(v)}</tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _differing(keys: Sequence[str], values: Any) -> list[str]:
    """The ``keys`` whose ``values(key)`` (one per run) are not all the same."""
    return [k for k in keys if len({json.dumps(v, sort_keys=True, default=str)
                                    for v in values(k)}) > 1]


def _side_by_side(runs: list[tuple[int, RunPage]]) -> str:
    """One row per run: the options that differ between the runs (those that change results),
    then the results that differ (all of them when none does), at most
    :data:`MAX_SIDE_COLUMNS`."""
    keys = list(dict.fromkeys(k for _, run in runs for k in run.result_options if k != "out"))
    differing = _differing(keys, lambda k: [run.result_options.get(k) for _, run in runs])
    every = list(dict.fromkeys(k for _, run in runs for k in run.results
                               if k not in ("command", "summary")))
    results = _differing(every, lambda k: [run.results.get(k) for _, run in runs]) or every
    results = [k for k in results if k not in differing]  # an option's column says it already
    left = max(0, len(results) - MAX_SIDE_COLUMNS)
    results = results[:MAX_SIDE_COLUMNS]
    head = ('<tr><th></th>'
            + (f'<th colspan="{len(differing)}">options that differ</th>' if differing else "")
            + (f'<th colspan="{len(results)}">results</th>' if results else "") + "</tr>")
    names = "".join(f"<th>{escape(str(c))}</th>" for c in ["run", *differing, *results])
    body = "".join(
        f'<tr><td><a href="#{run_id(n)}">{escape(str(run.path))}</a></td>'
        + "".join(_td(run.options.get(k)) for k in differing)
        + "".join(_td(run.results.get(k)) for k in results) + "</tr>" for n, run in runs)
    note = (f'<p class="note">{left:,} more results are in each run\'s section below</p>'
            if left else "")
    return (f'<h3>Side by side</h3><div class="scroll"><table class="side-by-side"><thead>'
            f"{head}<tr>{names}</tr></thead><tbody>{body}</tbody></table></div>{note}")


# -- one run -----------------------------------------------------------------------------------
def _run_section(number: int, run: RunPage) -> str:
    parts = [f'<section class="run" id="{run_id(number)}">'
             f"<h3>{escape(run.command)} <code>{escape(str(run.path))}</code></h3>",
             f'<p class="summary">{escape(run.summary or "(no summary)")}</p>']
    parts += [f'<p class="note">{escape(note)}</p>' for note in run.notes]
    parts.append("<h4>Provenance</h4>" + _key_values(_provenance_rows(run)))
    parts.append(f"<details><summary>Options ({len(run.options)})</summary>"
                 + _key_values([(k, v) for k, v in run.options.items()]) + "</details>")
    results = [(k, v) for k, v in run.results.items() if k not in ("command", "summary")]
    if results:
        parts.append("<h4>Results</h4>" + _key_values(results))
    if run.last_metrics is not None:
        parts.append(f"<h4>Metrics: the last of {_count(run.metrics_rows, 'row')}</h4>"
                     + _table(list(run.last_metrics), [list(run.last_metrics.values())]))
    parts += [_csv_table(table) for table in run.tables]
    if run.figures or run.figures_left_out:
        total = len(run.figures) + run.figures_left_out
        shown = f"{len(run.figures):,} of {total:,}" if run.figures_left_out else f"{total:,}"
        parts.append(f"<h4>Figures ({shown})</h4>")
        parts += [_figure(f) for f in run.figures]
        if run.figures_left_out:
            parts.append(f'<p class="note">{run.figures_left_out:,} more left out: a run shows '
                         "its first figures in name order (raise --max-figures for more) and no "
                         "file over 20 MB</p>")
    parts.append("</section>")
    return "\n".join(parts)


def _provenance_rows(run: RunPage) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("narrows (config.yaml)", run.narrows_version)]
    origin = run.provenance
    if run.provenance_file:
        rows.append(("from", run.provenance_file))
    for key, value in origin.items():
        if key == "options":
            continue  # the run's options are listed below
        if isinstance(value, dict):
            value = ", ".join(f"{k} {cell_text(v)}" for k, v in value.items())
        rows.append((key, value))
    return rows


def _csv_table(table: Table) -> str:
    note = []
    if table.total_rows > len(table.rows):
        note.append(f"first {len(table.rows):,} of {table.total_rows:,} rows")
    if table.total_columns > len(table.columns):
        note.append(f"first {len(table.columns):,} of {table.total_columns:,} columns")
    text = f' <span class="meta">({"; ".join(note)})</span>' if note else ""
    return (f"<h4>{escape(table.name)}{text}</h4>" + _table(table.columns, table.rows))


def _figure(figure: Figure) -> str:
    """An embedded image at its own size, or the page's width when it is wider."""
    source = f"data:{figure.mime};base64,{base64.b64encode(figure.data).decode('ascii')}"
    return (f'<figure><img src="{source}" alt="{escape(figure.name)}" loading="lazy">'
            f"<figcaption>{escape(figure.name)}</figcaption></figure>")
