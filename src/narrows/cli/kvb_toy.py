"""``narrows kvb toy`` (the 2-D experiment of Figure 2) and ``narrows kvb sweep`` (a grid of runs
of any kvb command, resumable, one results table)."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, open_run, start
from narrows.config import distinct, not_empty, option, positive, seed_range, unit_open

GROUPS.setdefault("kvb", "the discrete key-value bottleneck: frozen-encoder class-incremental "
                         "learning, the 2-D toy, sweeps")
TOY_MODELS = ("linear", "mlp", "vq-mlp", "kv-1x400", "kv-1x400-sgd", "kv-20x20")
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
QUICKSTART_MODELS = ("linear", "mlp", "kv-1x400", "kv-20x20")  # the rows of Figure 2
RESULTS = "results.json"
NAME_FIELDS = ("model", "protocol")  # what names an entry of a list-shaped results.json


@dataclass
class ToyConfig(CommonOptions):
    seeds: list[int] = option(list(DEFAULT_SEEDS), "seeds, each a full repetition (data, keys, "
                              "initialisation)", check=seed_range.also(not_empty, distinct))
    models: list[Literal["linear", "mlp", "vq-mlp", "kv-1x400", "kv-1x400-sgd", "kv-20x20"]] = (
        option(list(TOY_MODELS), "models to train"))
    steps: int = option(1000, "full-batch steps per stage", check=positive)
    train_points: int = option(100, "training points per stage (class of each by a fair coin)",
                               check=positive)
    test_points: int = option(1000, "test points per stage", check=positive)
    key_batches: int = option(1000, "batches of 100 uniform points the keys are fitted on",
                              check=positive)
    decay: float = option(0.95, "EMA decay of the key fitting", check=unit_open)
    kv_lr: float | None = option(None, "learning rate of the KV values [default: 1e-3, the "
                                 "authors']", check=positive)
    resolution: int = option(100, "decision-map points per axis", check=positive)


# -- toy --------------------------------------------------------------------------------------
def execute_toy(cfg: ToyConfig) -> int:
    import time

    from narrows.kvb import toy
    from narrows.runs import atomic_torch_save, default_out
    from narrows.runtime import format_duration

    session = start(cfg)
    run = open_run(cfg, "kvb toy", default_out("kvb-toy"), session)
    say = session.say
    seeds = list(dict.fromkeys(cfg.seeds))
    say(f"toy experiment: {len(cfg.models)} models × {len(seeds)} seed(s), 4 stages × "
        f"{cfg.steps} steps → {run.path}")
    began = time.perf_counter()
    done = {seed: _load_seed(run, f"seeds/seed{seed}") for seed in seeds
            if run.exists(f"seeds/seed{seed}.json") and run.exists(f"seeds/seed{seed}_maps.pt")}
    if done:
        say(f"  seed(s) {', '.join(map(str, done))}: finished before, loaded")
    todo = [seed for seed in seeds if seed not in done]
    if todo:
        say(f"  training seed(s) {', '.join(map(str, todo))} (the seeds of a model in lockstep)")
        for result in toy.run_seeds(todo, cfg.models, steps=cfg.steps,
                                    train_points=cfg.train_points, test_points=cfg.test_points,
                                    key_batches_count=cfg.key_batches, decay=cfg.decay,
                                    kv_lr=cfg.kv_lr, resolution=cfg.resolution,
                                    threads=cfg.threads or 1):  # tiny tensors: 1 by default
            stem = f"seeds/seed{result.seed}"
            if run.writer:
                atomic_torch_save(run.file(f"{stem}_maps.pt"), result.maps)
            run.write_json(f"{stem}.json", result.to_dict())
            done[result.seed] = result
    results = [done[seed] for seed in seeds]
    summary = toy.summarise(results)
    _write_toy_outputs(run, cfg, results, summary)
    say(f"\n{toy.summary_table(summary)}\n")
    say(f"({format_duration(time.perf_counter() - began)}) → {run.file('toy.md')}, toy.csv, "
        f"toy.png, {RESULTS}")
    session.close()
    return 0


def _load_seed(run: Any, stem: str) -> Any:
    import torch

    from narrows.kvb.toy import NUM_CLASSES, Evaluation, SeedResult
    from narrows.runs.files import read_torch_file, reading

    file = run.file(f"{stem}.json")
    data = run.read_json(f"{stem}.json", required_keys=("seed", "evaluations"))
    with reading(file, "cached per-seed result"):
        evaluations = [Evaluation.from_dict(e) for e in data["evaluations"]]
        for ev in evaluations:
            rows = ev.per_class
            if not (isinstance(rows, list) and rows and all(
                    isinstance(r, list) and len(r) == NUM_CLASSES
                    and all(isinstance(v, (int, float)) for v in r) for r in rows)):
                raise ValueError(f"per_class of {ev.model!r} is not lists of {NUM_CLASSES} numbers")
        seed, seconds = int(data["seed"]), float(data.get("seconds", 0.0))
    maps_file = run.file(f"{stem}_maps.pt")
    maps = read_torch_file(maps_file, "cached per-seed decision maps")
    with reading(maps_file, "cached per-seed decision maps"):
        if not (isinstance(maps, dict)
                and all(isinstance(v, torch.Tensor) and v.ndim == 3 for v in maps.values())):
            raise ValueError("not a dict of (moments, points, points) tensors")
    return SeedResult(seed, evaluations, maps, seconds)


def _write_toy_outputs(run: Any, cfg: ToyConfig, results: list[Any],
                       summary: dict[str, dict[str, Any]]) -> None:
    from narrows.kvb import toy
    from narrows.plotting import pyplot

    rows = toy.csv_rows(results)
    run.write_text("toy.csv", _csv(rows))
    seeds = ", ".join(str(r.seed) for r in results)
    run.write_text("toy.md", (
        f"# Toy experiment (Figure 2): {len(results)} seed(s) ({seeds}), {cfg.steps} steps per "
        f"stage, {cfg.train_points} training and {cfg.test_points} test points per stage\n\n"
        "Class-balanced accuracy on all 8 classes after stage 4 (mean ± std over seeds), accuracy "
        "on stage 1's classes right after stage 1 and at the end, per-class accuracy at the end, "
        "fraction of key-value pairs ever fetched.\n\n"
        f"{toy.summary_table(summary)}\n\n"
        "Accuracy on each task's classes after each stage (mean over seeds):\n\n"
        f"{toy.matrix_table(summary)}\n"))
    first = results[0]
    labels = {ev.model: ev.label for ev in first.evaluations}
    fig = toy.decision_figure(first.maps, toy.make_data(first.seed, cfg.train_points,
                                                        cfg.test_points), labels)
    run.save_figure("toy.png", fig)
    pyplot().close(fig)
    flat: dict[str, Any] = {}
    for key, s in summary.items():
        flat[f"final_{key}"] = s["final_mean"]
        flat[f"task1_end_{key}"] = s["task1_end"]
    run.write_json(RESULTS, {**flat, "seeds": [r.seed for r in results], "summary": summary})


def _csv(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "" if value is None else value


# -- quickstart -------------------------------------------------------------------------------
def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """The toy experiment with one seed and the four models of the paper's figure (seconds),
    into ``out/kvb-toy``."""

    target = out / "kvb-toy"
    execute_toy(ToyConfig(**{**cfg.inherited(target), "seeds": [cfg.seed],
                             "models": list(QUICKSTART_MODELS)}))
    from narrows.runs.files import read_json_file

    results = read_json_file(target / RESULTS, "toy results file", kind=dict)
    parts = [f"{name} {results[f'final_{name}']:.2f}"
             for name in ("kv-1x400", "kv-20x20", "mlp", "linear")]
    return (f"2-D toy, class-incremental, final 8-class accuracy: {', '.join(parts)}: "
            f"{target / 'toy.png'}")


# -- sweep ------------------------------------------------------------------------------------
@dataclass
class SweepConfig(CommonOptions):
    file: str | None = option(None, "the sweep's YAML file (command, options, grid)",
                              positional=True, metavar="SWEEP.yaml")
    wandb: bool = option(False, "also log each run's results to Weights & Biases (needs the "
                         "package wandb)", affects_result=False)
    wandb_project: str | None = option(None, "W&B project [default: the YAML's wandb_project, "
                                       "else narrows-kvb]", affects_result=False)
    dry_run: bool = option(False, "list the runs of the grid (done or to do) and stop",
                           affects_result=False)


@dataclass
class Sweep:
    """A parsed sweep file."""

    command: tuple[str, ...]
    name: str
    options: dict[str, Any]
    grid: dict[str, list[Any]]
    metrics: list[str] | None
    wandb_project: str | None


SWEEP_KEYS = ("command", "name", "options", "grid", "metrics", "wandb_project")


def read_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file; mistakes are one-line :class:`UserError`\\ s."""
    import yaml

    from narrows.errors import UserError
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
    safe_name(name, "sweep name")  # names runs/kvb-sweep/NAME
    return Sweep(words, name, options, grid,
                 [str(m) for m in metrics] if metrics else None, doc.get("wandb_project"))


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    from narrows.errors import UserError

    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"'{what}' in {path} must be a mapping of option: value",
                        "write one 'option: value' per line under it")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


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


def find_command(words: tuple[str, ...]) -> Command:
    """The registered command named by ``words``."""
    from narrows.cli.app import COMMANDS, _load_commands
    from narrows.errors import UserError

    _load_commands()
    for command in COMMANDS:
        if command.words == words:
            return command
    kvb = sorted(" ".join(c.words) for c in COMMANDS if c.words[0] == "kvb" and
                 c.words[-1] != "sweep")
    raise UserError(f"no command 'narrows {' '.join(words)}'",
                    f"the sweep's command must be one of: {', '.join(kvb) or 'kvb toy'}")


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


def require_wandb() -> Any:
    """The wandb module, or a one-line :class:`UserError` naming the missing package."""
    import importlib

    from narrows.errors import UserError

    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise UserError("--wandb needs the package 'wandb', which is not installed",
                        "install it (pip install wandb) or run without --wandb") from None


def execute_sweep(cfg: SweepConfig) -> int:
    from narrows import config as cfgmod
    from narrows.errors import UserError
    from narrows.runs import RunDir, default_out

    if not cfg.file:
        raise UserError("no sweep file given", "run 'narrows kvb sweep SWEEP.yaml'")
    sweep = read_sweep(cfg.file)
    wandb = require_wandb() if cfg.wandb and not cfg.dry_run else None
    command = find_command(sweep.command)
    if command.words[-1] == "sweep":
        raise UserError("a sweep cannot run sweeps", "name another command in 'command'")
    out = Path(cfg.out) if cfg.out else default_out("kvb-sweep", sweep.name)
    inherited = {k: v for k, v in cfg.inherited().items() if k != "out"}
    combos = expand_grid(sweep.grid)
    plans = []
    for combo in combos:
        path = out / "runs" / run_name(combo)
        run_cfg = cfgmod.build(command.config, inherited, sweep.options, combo, {"out": str(path)},
                               source=f"sweep file {cfg.file}")
        plans.append((combo, path, run_cfg))
    names = [p.name for _, p, _ in plans]
    if len(set(names)) != len(names):
        raise UserError(f"two runs of {cfg.file} get the same directory name",
                        "make the grid's values distinct")
    label = f"narrows {' '.join(command.words)}"
    if cfg.dry_run:
        for combo, path, _ in plans:
            state = "done" if (path / RESULTS).is_file() else "to do"
            print(f"{state:>6}  {path}  {combo}")
        print(f"{len(plans)} run(s) of {label}")
        return 0
    sweep_doc = {"command": " ".join(command.words), "options": sweep.options,
                 "grid": sweep.grid, "metrics": sweep.metrics}
    run = RunDir.open(out, "kvb sweep", {**cfgmod.to_dict(cfg), "sweep": sweep_doc},
                      {"command": sweep_doc["command"], "options": sweep.options},
                      overwrite=cfg.overwrite)
    print(f"sweep '{sweep.name}': {len(plans)} run(s) of {label} → {run.path}")
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for i, (combo, path, run_cfg) in enumerate(plans, 1):
        shown = ", ".join(f"{k}={v}" for k, v in combo.items()) or "(no grid)"
        if (path / RESULTS).is_file():
            status = "done before"
            print(f"[{i}/{len(plans)}] {shown}: finished before, skipped")
        else:
            print(f"[{i}/{len(plans)}] {shown} → {path}")
            try:
                command.run(run_cfg)
                status = "done"
            except UserError as exc:
                print(f"  failed: {exc}")
                status = f"failed: {exc.what}"
                failures.append(f"{path.name}: {exc.what}")
        metrics = (flatten_results(RunDir(path).read_json(RESULTS), sweep.metrics)
                   if (path / RESULTS).is_file() else {})
        row = {"run": path.name, **{k: _cell(v) for k, v in combo.items()}, "status": status,
               **metrics}
        rows.append(row)
        if wandb is not None and status == "done":
            _log_wandb(wandb, cfg, sweep, path, run_cfg, combo, metrics)
        run.write_text("results.csv", _csv(rows))
        run.write_text("results.md", markdown_table(rows))
    print(f"\n{markdown_table(rows)}\n\n→ {run.file('results.csv')}, results.md")
    if failures:  # a run refused its options: the sweep's user error, exit code 2
        raise UserError(f"{len(failures)} of {len(plans)} run(s) failed (first: {failures[0]})",
                        "fix the cause and rerun the sweep; finished runs are skipped")
    return 0


def _log_wandb(wandb: Any, cfg: SweepConfig, sweep: Sweep, path: Path, run_cfg: Any,
               combo: dict[str, Any], metrics: dict[str, Any]) -> None:
    from narrows import config as cfgmod

    project = cfg.wandb_project or sweep.wandb_project or "narrows-kvb"
    logged = wandb.init(project=project, group=sweep.name, name=path.name, dir=str(path),
                        config={"command": " ".join(sweep.command), **cfgmod.to_dict(run_cfg)},
                        tags=[f"{k}={v}" for k, v in combo.items()][:20])
    logged.log({k: v for k, v in metrics.items() if _number(v)})
    logged.finish()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of a sweep as a Markdown table (numbers to 4 significant figures)."""
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def show(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


register(Command(
    words=("kvb", "toy"),
    summary="the 2-D toy of Figure 2: 8 Gaussian classes in 4 stages; KV bottlenecks vs linear "
    "probe, MLP and VQ + MLP",
    description="Eight Gaussian classes (σ 0.035) in the unit square arrive in four stages of "
    "two. Each model trains on the current stage only (full batch, --steps steps per stage, "
    "cross-entropy over all 8 classes): a linear probe (Adam 1e-2) and an MLP 2-32-8 (Adam "
    "1e-3), both with a new optimiser per stage; a VQ layer (frozen keys) with a trainable MLP "
    "decoder; key-value bottlenecks with 1 codebook × 400 pairs (identity heads; Adam and SGD) "
    "and 20 × 20 (random projections). Keys are fitted by EMA k-means on uniform unlabelled "
    "points and frozen; only values train. KV models are evaluated with never-fetched pairs "
    "pruned, and without. Writes toy.csv (every model, seed, stage and class), toy.md (the "
    "tables), toy.png (decision maps per model and stage, first seed) and results.json. Seeds "
    "finished before are loaded, not rerun. The seeds of a model train in lockstep (one batched "
    "step; each seed gets exactly its own update), single-threaded unless --threads is given "
    "(the tensors are tiny).",
    config=ToyConfig,
    target="narrows.cli.kvb_toy:execute_toy",
    epilog="examples:\n  narrows kvb toy\n  narrows kvb toy --seeds 0 --models kv-1x400 mlp "
    "--steps 200",
))
register(Command(
    words=("kvb", "sweep"),
    summary="run a grid over the options of a kvb command (resumable) into one results table",
    description="SWEEP.yaml names a command ('command: kvb toy' or 'command: kvb train'), "
    "'options' every run shares and a 'grid' of option: [values]; every combination runs "
    "locally, one after the other, in OUT/runs/<option=value-...>. A run whose directory holds "
    "results.json is finished and skipped, so rerunning the sweep (or growing its grid) does only "
    "what is missing; an interrupted run resumes as its command does. The numbers of each run's "
    "results.json ('metrics' picks dotted keys; default: every number at the top level and one "
    "level down) form results.csv and results.md in OUT. With --wandb (package wandb installed) "
    "each run's options and numbers are also logged to Weights & Biases.",
    config=SweepConfig,
    target="narrows.cli.kvb_toy:execute_sweep",
    epilog="example SWEEP.yaml:\n  command: kvb toy\n  options: {seeds: [0, 1]}\n  grid:\n"
    "    steps: [100, 1000]\n    kv_lr: [0.001, 0.01]\n  metrics: [final_kv-1x400, final_mlp]\n"
    "\n  narrows kvb sweep sweep.yaml [--out DIR] [--wandb --wandb-project NAME] [--dry-run]",
))
