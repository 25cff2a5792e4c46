"""A sweep: a grid over the options of any command, run locally one after the other, resumable,
gathered into one results table (``results.csv``, ``results.md``).

The core never imports the command line: :func:`plan_sweep` takes a ``find_command`` callable
that turns the sweep file's command words into something with ``words``, ``config`` (a config
dataclass built with :func:`narrows.config.build`) and ``run(cfg)``, such as
``narrows.cli.app.Command``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from narrows.config import option_mapping
from narrows.errors import UserError
from narrows.runs.results import flat_summary
from narrows.runs.tables import csv_text, markdown_text

RESULTS = "results.json"
FORMAT_KIND, FORMAT_VERSION = "sweep", 1  # the "format" of a saved SweepResult
NAME_FIELDS = ("model", "protocol")  # what names an entry of a list-shaped results.json
SWEEP_KEYS = ("command", "name", "options", "grid", "metrics", "wandb_project")


class SweepCommand(Protocol):
    """What a sweep needs of a command: its words, its config class and a way to run it."""

    words: tuple[str, ...]
    config: type

    def run(self, cfg: Any) -> int: ...


@dataclass
class Sweep:
    """A parsed sweep file."""

    command: tuple[str, ...]
    name: str
    options: dict[str, Any]
    grid: dict[str, list[Any]]
    metrics: list[str] | None
    wandb_project: str | None


@dataclass
class PlannedRun:
    """One combination of the grid: its values, its directory and its built config."""

    combo: dict[str, Any]
    path: Path
    config: Any

    @property
    def done(self) -> bool:
        """Whether the run finished before (its directory holds ``results.json``)."""
        return (self.path / RESULTS).is_file()


@dataclass
class SweepPlan:
    """Every run of a sweep, and the command they run."""

    sweep: Sweep
    command: SweepCommand
    out: Path
    runs: list[PlannedRun]
    source: str

    @property
    def label(self) -> str:
        """``narrows WORDS`` of the command."""
        return f"narrows {' '.join(self.command.words)}"


@dataclass
class SweepResult:
    """The rows of a finished sweep (one per run: name, grid values, status, metrics)."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many runs finished, were done before or failed."""
        done = sum(1 for r in self.rows if r.get("status") == "done")
        before = sum(1 for r in self.rows if r.get("status") == "done before")
        return (f"sweep {self.path.name}: {len(self.rows)} run(s), {done} done, {before} done "
                f"before, {len(self.failures)} failed")

    def headline(self) -> dict[str, int]:
        """The counts of :meth:`summary` (the sweep's ``results.json``)."""
        statuses = [str(r.get("status")) for r in self.rows]
        return {"runs": len(self.rows), "done": statuses.count("done"),
                "done_before": statuses.count("done before"), "failed": len(self.failures)}

    def table(self) -> str:
        """The results table as Markdown."""
        return markdown_table(self.rows)

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat record per run: name, grid values, status, metrics."""
        return [dict(row) for row in self.rows]

    def save(self, path: str | Path) -> Path:
        """Write the rows and failures as JSON (with the header) to ``path``."""
        from narrows.runs.files import atomic_write_json
        from narrows.runs.results import header, provenance

        origin = provenance(options={"out": str(self.path)})
        return atomic_write_json(path, {**header(FORMAT_KIND, FORMAT_VERSION, origin),
                                        "path": str(self.path), "rows": self.rows,
                                        "failures": self.failures})

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """A result written by :meth:`save`."""
        from narrows.runs.files import read_json_file
        from narrows.runs.results import check_header

        doc = read_json_file(path, "sweep result file", required_keys=("rows",), kind=dict)
        check_header(doc, FORMAT_KIND, FORMAT_VERSION, str(path))
        return cls(Path(doc.get("path", Path(path).parent)), list(doc["rows"]),
                   list(doc.get("failures", [])))

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The first numeric metric per run as bars (the runs' count per status when there is
        none), on ``ax`` or a new figure."""
        from narrows.plotting import pyplot

        if ax is None:
            _, ax = pyplot().subplots(figsize=(6, 3))
        skip = {"run", "status"}
        metric = next((k for row in self.rows for k, v in row.items()
                       if k not in skip and _number(v)), None)
        if metric is not None:
            names = [str(r.get("run")) for r in self.rows]
            values = [r.get(metric) if _number(r.get(metric)) else float("nan") for r in self.rows]
            ax.bar(range(len(names)), values)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
            ax.set_ylabel(metric)
        else:
            statuses = list(dict.fromkeys(str(r.get("status")) for r in self.rows))
            ax.bar(range(len(statuses)),
                   [sum(1 for r in self.rows if str(r.get("status")) == s) for s in statuses])
            ax.set_xticks(range(len(statuses)), statuses, fontsize=7)
            ax.set_ylabel("runs")
        ax.set_title(f"sweep {self.path.name}", fontsize=9)
        return ax.figure, ax


def read_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; mistakes are one-line :class:`UserError`\\ s."""
    import yaml

    from narrows.runs.run import safe_name

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist", "check the path")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"sweep file {path} is not valid YAML", "fix its syntax") from None
    if not isinstance(doc, dict) or "command" not in doc:
        raise UserError(f"sweep file {path} has no 'command'",
                        "start it with e.g. 'command: kvb toy'")
    unknown = sorted(set(doc) - set(SWEEP_KEYS))
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' in sweep file {path}",
                        f"valid keys: {', '.join(SWEEP_KEYS)}")
    words = tuple(str(doc["command"]).split())
    if not words or words[0] == "narrows":
        words = words[1:]
    options = _mapping(doc.get("options"), "options", path)
    grid = _mapping(doc.get("grid"), "grid", path)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid entry '{key}' in {path} is not a non-empty list",
                            f"write e.g. '{key}: [value1, value2]'")
    both = sorted(set(options) & set(grid))
    if both:
        raise UserError(f"'{both[0]}' is both in options and in the grid of {path}",
                        "keep it in one of them")
    if "out" in options or "out" in grid:
        raise UserError(f"{path} sets 'out'", "the sweep chooses each run's directory; drop it")
    metrics = doc.get("metrics")
    if metrics is not None and (not isinstance(metrics, list) or not metrics):
        raise UserError(f"'metrics' in {path} must be a list of results.json keys",
                        "write e.g. 'metrics: [final_kv-1x400]', or drop it")
    name = str(doc.get("name") or path.stem)
    safe_name(name, "sweep name")  # names the default output directory, e.g. runs/sweep/NAME
    return Sweep(words, name, options, grid,
                 [str(m) for m in metrics] if metrics else None, doc.get("wandb_project"))


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    return option_mapping(value, f"'{what}' in {path} must be a mapping",
                          "write one 'option: value' per line under it")


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(grid[k] for k in keys))]


def run_name(combo: dict[str, Any]) -> str:
    """A directory name made from the combination's values (stable when the grid grows)."""
    if not combo:
        return "run"

    def text(value: Any) -> str:
        return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    name = "-".join(f"{k}={text(v)}" for k, v in combo.items())
    name = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name).strip("_")
    if len(name) > 80:
        digest = hashlib.sha1(repr(sorted(combo.items())).encode()).hexdigest()[:8]
        name = f"{name[:70]}-{digest}"
    return name


def flatten_results(results: Any, metrics: list[str] | None) -> dict[str, Any]:
    """The numbers of a run's results.json as one flat row.

    A mapping gives its numbers by key and those of nested mappings as ``key.sub``; a list of
    mappings (``kvb train``: one per model and protocol) gives ``name.key``, the name made of
    the entry's ``model`` and ``protocol`` (else its text fields), e.g.
    ``dkvb/incremental.final_accuracy``. ``metrics`` picks columns by these names, or by a
    dotted path into the file.
    """
    flat: dict[str, Any] = {}
    if isinstance(results, dict):
        for key, value in results.items():
            if _number(value):
                flat[key] = value
            elif isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items() if _number(v)})
    elif isinstance(results, list):
        for i, entry in enumerate(results):
            if not isinstance(entry, dict):
                continue
            named = [k for k in NAME_FIELDS if k in entry] or [
                k for k, v in entry.items() if isinstance(v, str)]
            name = "/".join(str(entry[k]) for k in named) or str(i)
            flat.update({f"{name}.{k}": v for k, v in entry.items() if _number(v)})
    if not metrics:
        return flat
    row: dict[str, Any] = {}
    for path in metrics:
        value: Any = flat.get(path)
        if value is None:
            value = results
            for part in path.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        row[path] = value
    return row


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- tables -----------------------------------------------------------------------------------
def csv_table(rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text (:func:`narrows.runs.tables.csv_text`, lists joined by spaces); no rows
    give an empty text."""
    return csv_text([_flat(row) for row in rows]) if rows else ""


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of a sweep as a Markdown table (:func:`narrows.runs.tables.markdown_text`, lists
    joined by spaces, no final newline)."""
    return markdown_text([_flat(row) for row in rows]).rstrip("\n")


def cell(value: Any) -> Any:
    """One grid value in a row: floats to 6 significant figures, lists joined by spaces,
    ``None`` empty."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "" if value is None else value


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    return {k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            for k, v in row.items()}


# -- planning and running ---------------------------------------------------------------------
def plan_sweep(sweep: Sweep, out: str | Path,
               find_command: Callable[[tuple[str, ...]], SweepCommand], *,
               base_options: dict[str, Any] | None = None,
               file: str | Path | None = None) -> SweepPlan:
    """Every run of ``sweep`` under ``out/runs/<option=value-...>``, each config built from
    ``base_options`` (e.g. device, threads, seed), the sweep's options and its combination.
    Options a command does not have, or values it refuses, are a :class:`UserError` naming
    ``file`` (the sweep file)."""
    from narrows import config as cfgmod

    source = f"sweep file {file}" if file is not None else "sweep"

    command = find_command(sweep.command)
    if command.words[-1] == "sweep":
        raise UserError("a sweep cannot run sweeps", "name another command in 'command'")
    out = Path(out)
    inherited = {k: v for k, v in (base_options or {}).items() if k != "out"}
    runs = []
    for combo in expand_grid(sweep.grid):
        path = out / "runs" / run_name(combo)
        run_cfg = cfgmod.build(command.config, inherited, sweep.options, combo,
                               {"out": str(path)}, source=source)
        runs.append(PlannedRun(combo, path, run_cfg))
    names = [r.path.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError(f"two runs of {file if file is not None else 'the sweep'} get the same "
                        "directory name", "make the grid's values distinct")
    return SweepPlan(sweep, command, out, runs, source)


def run_sweep(plan: SweepPlan, *, run_command: str = "sweep",
              options: dict[str, Any] | None = None, overwrite: bool = False,
              wandb: Any = None, wandb_project: str | None = None,
              default_project: str = "narrows", say: Callable[[str], Any] = print) -> SweepResult:
    """Run every unfinished run of ``plan`` in turn, into the run directory ``plan.out`` opened
    for ``run_command`` with ``options`` recorded; runs that finished before are skipped.
    After each run ``results.csv`` and ``results.md`` are rewritten, and ``results.json`` (the
    flat summary) once all ran. ``wandb``: the imported
    module to log each new run to (project ``wandb_project``, else the sweep file's, else
    ``default_project``). A run that refuses its options is recorded as failed and the sweep goes on;
    at the end any failure is one :class:`UserError`."""
    from narrows import config as cfgmod
    from narrows.runs import RunDir

    sweep, command = plan.sweep, plan.command
    sweep_doc = {"command": " ".join(command.words), "options": sweep.options,
                 "grid": sweep.grid, "metrics": sweep.metrics}
    run = RunDir.open(plan.out, run_command, {**(options or {}), "sweep": sweep_doc},
                      {"command": sweep_doc["command"], "options": sweep.options},
                      overwrite=overwrite)
    say(f"sweep '{sweep.name}': {len(plan.runs)} run(s) of {plan.label} → {run.path}")
    if run.writer:  # an earlier pass's summary would call this unfinished pass finished
        (run.path / RESULTS).unlink(missing_ok=True)
    result = SweepResult(run.path)
    for i, planned in enumerate(plan.runs, 1):
        combo, path = planned.combo, planned.path
        shown = ", ".join(f"{k}={v}" for k, v in combo.items()) or "(no grid)"
        if planned.done:
            status = "done before"
            say(f"[{i}/{len(plan.runs)}] {shown}: finished before, skipped")
        else:
            say(f"[{i}/{len(plan.runs)}] {shown} → {path}")
            try:
                command.run(planned.config)
                status = "done"
            except UserError as exc:
                say(f"  failed: {exc}")
                status = f"failed: {exc.what}"
                result.failures.append(f"{path.name}: {exc.what}")
        metrics = (flatten_results(RunDir(path).read_json(RESULTS), sweep.metrics)
                   if planned.done else {})
        result.rows.append({"run": path.name, **{k: cell(v) for k, v in combo.items()},
                            "status": status, **metrics})
        if wandb is not None and status == "done":
            project = wandb_project or sweep.wandb_project or default_project
            logged = wandb.init(project=project, group=sweep.name, name=path.name, dir=str(path),
                                config={"command": " ".join(sweep.command),
                                        **cfgmod.to_dict(planned.config)},
                                tags=[f"{k}={v}" for k, v in combo.items()][:20])
            logged.log({k: v for k, v in metrics.items() if _number(v)})
            logged.finish()
        run.write_text("results.csv", csv_table(result.rows))
        run.write_text("results.md", markdown_table(result.rows))
    run.write_json(RESULTS, flat_summary(result, command=run_command))  # once every run ran
    say(f"\n{markdown_table(result.rows)}\n\n→ {run.file('results.csv')}, results.md")
    if result.failures:  # a run refused its options: the sweep's user error, exit code 2
        raise UserError(f"{len(result.failures)} of {len(plan.runs)} run(s) failed (first: "
                        f"{result.failures[0]})",
                        "fix the cause and rerun the sweep; finished runs are skipped")
    return result
