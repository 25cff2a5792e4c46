"""One self-contained HTML page of narrows run directories (``narrows report``).

Built only from what the runs already saved: ``config.yaml`` (command, version, options),
``results.json`` (the flat summary), the header of a saved result (provenance), the top-level
CSV tables, the last row of ``metrics.jsonl`` and every figure under the run, embedded as
``data:`` URIs, so the page needs no network and no script. The page itself is drawn by
:mod:`narrows.runs.report_html`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from narrows.errors import UserError
from narrows.runs.run import CONFIG_FILE, METRICS_FILE

FIGURE_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg",
                ".jpeg": "image/jpeg"}
SKIPPED_FOLDERS = {"tensorboard", "wandb", "__pycache__"}  # loggers' folders hold copies
MAX_FIGURES = 40  # per run: a run with a thousand heatmaps must not make a 500 MB page
MAX_ROWS = 50  # per table
MAX_COLUMNS = 40  # per table
MAX_FIGURE_BYTES = 20 * 2**20  # a larger file is left out (and counted)
MAX_HEADER_JSON_BYTES = 2 * 2**20  # JSON files read to find a provenance header...
MAX_HEADER_FILES = 20  # ...and how many of them at most


@dataclass
class Table:
    """A CSV file of a run: ``columns``, the first ``rows`` (values parsed back to numbers
    where they are numbers) and how many rows and columns the file has in all."""

    name: str
    columns: list[str]
    rows: list[list[Any]]
    total_rows: int
    total_columns: int


@dataclass
class Figure:
    """An image file of a run: its path relative to the run, MIME type and bytes."""

    name: str
    mime: str
    data: bytes


@dataclass
class RunPage:
    """What the report shows of one run directory (see :func:`read_run`)."""

    path: Path
    command: str
    narrows_version: str
    options: dict[str, Any]
    result_options: dict[str, Any]  # the options that change results (not device, --log, ...)
    results: dict[str, Any]  # results.json flattened ("final.top1"), without its header
    summary: str
    provenance: dict[str, Any]  # from the first saved result with a header; may be empty
    provenance_file: str | None
    tables: list[Table]
    last_metrics: dict[str, Any] | None
    metrics_rows: int
    figures: list[Figure]
    figures_left_out: int
    notes: list[str] = field(default_factory=list)  # damaged files, ...


@dataclass
class Report:
    """A report of run directories: the ``runs`` read, the page as ``html``, and the ``path``
    it was saved to (``None`` until :meth:`save`)."""

    title: str
    runs: list[RunPage]
    generated: str
    html: str = ""
    path: Path | None = None

    @property
    def commands(self) -> list[str]:
        """The commands of the runs, in the order their first run appears."""
        return list(dict.fromkeys(run.command for run in self.runs))

    @property
    def n_figures(self) -> int:
        """How many figures the page embeds."""
        return sum(len(run.figures) for run in self.runs)

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (atomically; parent folders are made); returns it."""
        from narrows.runs.files import atomic_write_text

        self.path = atomic_write_text(path, self.html)
        return self.path

    def summary(self) -> str:
        """One line: ``N runs of M commands, K figures → path``."""
        runs, commands = len(self.runs), len(self.commands)
        left = sum(run.figures_left_out for run in self.runs)
        line = (f"{runs} run{'s' * (runs != 1)} of {commands} command{'s' * (commands != 1)}, "
                f"{self.n_figures} figure{'s' * (self.n_figures != 1)}")
        if left:
            line += f" ({left} left out)"
        return f"{line} → {self.path}" if self.path is not None else f"{line} (not saved)"


def build_report(run_dirs: Sequence[str | Path], *, title: str | None = None,
                 max_figures: int = MAX_FIGURES, max_rows: int = MAX_ROWS) -> Report:
    """The report of ``run_dirs`` (save it with :meth:`Report.save`).

    Each path is a run directory (it holds a narrows ``config.yaml``) or a folder holding runs
    (such as a quickstart's output): then every run at or under it is taken, sorted by path, and
    a run's own files exclude those of the runs inside it. A path given twice is shown once.
    ``title`` heads the page (default ``narrows report``); each run shows at most
    ``max_figures`` figures and each table its first ``max_rows`` rows, saying what was left
    out. A path that holds no narrows run is a :class:`UserError` naming it.
    """
    from narrows import __version__
    from narrows.runs.report_html import render

    paths = find_runs(run_dirs)
    runs = [read_run(path, max_figures=max_figures, max_rows=max_rows) for path in paths]
    report = Report(title=title or "narrows report", runs=runs,
                    generated=datetime.now().astimezone().isoformat(timespec="seconds"))
    report.html = render(report, narrows_version=__version__)
    return report


def write_report(run_dirs: Sequence[str | Path], out: str | Path, *, title: str | None = None,
                 max_figures: int = MAX_FIGURES, max_rows: int = MAX_ROWS) -> Report:
    """:func:`build_report` of ``run_dirs`` (with ``title``, ``max_figures``, ``max_rows``)
    saved to ``out``; returns the report."""
    report = build_report(run_dirs, title=title, max_figures=max_figures, max_rows=max_rows)
    report.save(out)
    return report


# -- finding runs ------------------------------------------------------------------------------
def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """The run directories at or under each of ``paths`` (see :func:`build_report`)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no run directories given", "name one or more narrows run directories")
    found: dict[Path, Path] = {}  # resolved path -> the path as found
    for given in map(Path, paths):
        fix = "pass a directory a narrows command wrote (it holds a config.yaml)"
        if not given.exists():
            raise UserError(f"{given} does not exist", fix)
        if not given.is_dir():
            raise UserError(f"{given} is a file, not a narrows run directory", fix)
        runs = [d for d in _walk_dirs(given) if _run_config(d) is not None]
        if not runs:
            raise UserError(f"{given} is not a narrows run directory and holds none", fix)
        for run in sorted(runs):
            found.setdefault(run.resolve(), run)
    return list(found.values())


def _walk_dirs(top: Path) -> list[Path]:
    """``top`` and the folders under it, without hidden and tensorboard folders."""
    out = []
    for folder, subfolders, _ in os.walk(top):
        subfolders[:] = sorted(s for s in subfolders if not _skipped(s))
        out.append(Path(folder))
    return out


def _skipped(folder: str) -> bool:
    return folder.startswith(".") or folder in SKIPPED_FOLDERS


def _run_config(directory: Path) -> dict[str, Any] | None:
    """The narrows config of ``directory``, or ``None`` when it holds none (or another tool's)."""
    import yaml

    file = directory / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None
    return data if isinstance(data, dict) and "command" in data else None


# -- reading one run ---------------------------------------------------------------------------
def read_run(path: str | Path, *, max_figures: int = MAX_FIGURES,
             max_rows: int = MAX_ROWS) -> RunPage:
    """What the report shows of the run directory ``path``: at most ``max_figures`` figures
    and ``max_rows`` rows of each table. A damaged results or metrics file becomes a note."""
    path = Path(path)
    config = _run_config(path)
    if config is None:
        raise UserError(f"{path} is not a narrows run directory (no valid {CONFIG_FILE})",
                        "pass a directory a narrows command wrote")
    notes: list[str] = []
    document = _read_json(path / "results.json", notes)
    results = _flatten({k: v for k, v in (document or {}).items()
                        if k not in ("format", "provenance")})
    if document is None and not (path / "results.json").exists():
        notes.append("no results.json (the run is unfinished, or its command writes none)")
    files = _own_files(path)
    origin, origin_file = _find_provenance(path, document, files)
    figures, left_out = _figures(path, files, max_figures)
    last, n_metrics = _last_metrics(path / METRICS_FILE, notes)
    tables = [table for f in sorted(path.glob("*.csv")) if f.is_file()
              if (table := _read_table(f, max_rows, notes)) is not None]
    options = config.get("options") if isinstance(config.get("options"), dict) else {}
    result_options = config.get("result_options")
    summary = _summary_line(results) if results else _unfinished(last, n_metrics)
    return RunPage(path=path, command=str(config["command"]),
                   narrows_version=str(config.get("narrows_version", "?")), options=options,
                   result_options=result_options if isinstance(result_options, dict) else options,
                   results=results, summary=summary, provenance=origin,
                   provenance_file=origin_file, tables=tables, last_metrics=last,
                   metrics_rows=n_metrics, figures=figures, figures_left_out=left_out,
                   notes=notes)


def _read_json(file: Path, notes: list[str]) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        notes.append(f"{file.name} is damaged ({type(exc).__name__})")
        return None
    if isinstance(data, list):  # kvb train's older results.json: one entry per model
        from narrows.runs.sweep import flatten_results

        return flatten_results(data, None)
    return data if isinstance(data, dict) else {"value": data}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``{"final": {"top1": 1}}`` → ``{"final.top1": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _summary_line(results: dict[str, Any]) -> str:
    """The ``summary`` of results.json, else its first scalar values as ``key value · ...``."""
    if isinstance(results.get("summary"), str):
        return results["summary"]
    from narrows.runs.tables import markdown_cell

    parts = [f"{k} {markdown_cell(v)}" for k, v in results.items()
             if k != "command" and (isinstance(v, (int, float, bool)) or
                                    isinstance(v, str) and len(v) <= 40)]
    return " · ".join(parts[:12]) + (" · …" if len(parts) > 12 else "")


def _unfinished(last: dict[str, Any] | None, rows: int) -> str:
    """The summary of a run without results.json: how far its metrics got, else nothing."""
    if last is None:
        return ""
    from narrows.runs.tables import markdown_cell

    shown = [f"{k} {markdown_cell(v)}" for k, v in last.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)][:6]
    return f"unfinished: {rows:,} row{'s' * (rows != 1)} of metrics; the last: " + ", ".join(shown)


def _find_provenance(run: Path, results: dict[str, Any] | None,
                     files: list[Path]) -> tuple[dict[str, Any], str | None]:
    """The provenance header of results.json, else of the first small JSON file among the
    run's ``files`` that has one (top level first)."""
    if results is not None and isinstance(results.get("provenance"), dict):
        return results["provenance"], "results.json"
    candidates = sorted((f for f in files if f.suffix.lower() == ".json"),
                        key=lambda f: (len(f.relative_to(run).parts), str(f)))
    candidates = [f for f in candidates if f.name != "results.json"
                  and _size_of(f) <= MAX_HEADER_JSON_BYTES]
    for file in candidates[:MAX_HEADER_FILES]:
        document = _read_json(file, [])
        if document is not None and isinstance(document.get("provenance"), dict):
            return document["provenance"], str(file.relative_to(run))
    return {}, None


def _size_of(file: Path) -> float:
    """The size of ``file`` in bytes, or infinity when it cannot be read."""
    try:
        return file.stat().st_size
    except OSError:
        return math.inf


def _own_files(run: Path) -> list[Path]:
    """The files of ``run`` (sorted), without hidden and tensorboard folders and without the
    runs nested inside it (they have their own section)."""
    files = []
    for folder, subfolders, names in os.walk(run):
        subfolders[:] = sorted(s for s in subfolders if not _skipped(s)
                               and _run_config(Path(folder) / s) is None)
        files += [Path(folder) / n for n in sorted(names) if not n.startswith(".")
                  and (Path(folder) / n).is_file()]  # no dangling links
    return files


def _figures(run: Path, files: list[Path], limit: int) -> tuple[list[Figure], int]:
    found = [f for f in files if f.suffix.lower() in FIGURE_TYPES]
    found.sort(key=lambda f: _natural(f.relative_to(run).as_posix()))
    kept, left_out = [], 0
    for file in found:
        try:
            if len(kept) >= limit or file.stat().st_size > MAX_FIGURE_BYTES:
                left_out += 1
                continue
            data = file.read_bytes()
        except OSError:  # a dangling link, no permission: counted, not shown
            left_out += 1
            continue
        kept.append(Figure(file.relative_to(run).as_posix(), FIGURE_TYPES[file.suffix.lower()],
                           data))
    return kept, left_out


def _natural(name: str) -> list[Any]:
    """A sort key that puts ``heatmap_32`` before ``heatmap_104``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def _last_metrics(file: Path, notes: list[str]) -> tuple[dict[str, Any] | None, int]:
    """The last row of ``metrics.jsonl`` and how many rows it has."""
    if not file.is_file():
        return None, 0
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        notes.append(f"{file.name} cannot be read ({type(exc).__name__})")
        return None, 0
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row, len(lines)
    notes.append(f"{file.name} holds no readable row")
    return None, len(lines)


_INTEGER = re.compile(r"[+-]?\d+")


def _number(text: str) -> Any:
    """A CSV cell back as the int or float it was written from; other text unchanged."""
    text = text.strip()
    if _INTEGER.fullmatch(text):
        return int(text)
    if "_" not in text:
        try:
            value = float(text)
        except ValueError:
            return text
        return value if math.isfinite(value) or text.lower() in ("nan", "inf", "-inf") else text
    return text


def _read_table(file: Path, max_rows: int, notes: list[str]) -> Table | None:
    """The table of a CSV file, or ``None`` (and a note) when it cannot be read."""
    rows: list[list[Any]] = []
    total = 0
    try:
        with open(file, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            columns = next(reader, [])
            for row in reader:
                total += 1
                if len(rows) < max_rows:
                    rows.append([_number(cell) for cell in row[:MAX_COLUMNS]])
    except (csv.Error, OSError) as exc:
        notes.append(f"{file.name} cannot be read as a table ({type(exc).__name__})")
        return None
    return Table(file.name, columns[:MAX_COLUMNS], rows, total, len(columns))
