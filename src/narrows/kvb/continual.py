"""The class-incremental protocols on stored embeddings: :func:`train_continual`.

Cut the classes into tasks, fit the key-value layer's keys on unlabelled embeddings, then train
every model of :data:`narrows.kvb.registry.LEARNERS` asked for on the incremental stream and/or
the i.i.d. control with the same sample visits; one :class:`ContinualResult` per model and
protocol, gathered in a :class:`ContinualRun`.

What the embeddings say is the default (:func:`load_task`, :func:`resolve_settings`): the data
set (the only one with train and test embeddings in the directory), its classes and their names,
a task size that divides the classes, and epochs, key count and key dimension scaled to the
number and dimension of the embeddings.

Mistakes are :class:`~narrows.errors.UserError`\\ s that name parameters in backticks
(```dim_key```); the command line shows them as flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from narrows.config import settings_from
from narrows.errors import UserError
from narrows.kvb.options import ContinualOptions

#: The models run when none are named (``narrows kvb train``'s default).
DEFAULT_MODELS = ("dkvb", "linear", "mlp")


@dataclass
class ContinualSettings(ContinualOptions):
    """The options of :func:`train_continual`, with the command line's defaults.

    ``None`` means "from the embeddings" (see :func:`resolve_settings`). See ``narrows kvb
    train --help`` for each option (the flag is the name with dashes).
    """

    seed: int = 0

    @classmethod
    def from_options(cls, options: Any = None, **changes: Any) -> ContinualSettings:
        """Settings from the same-named attributes of ``options`` (e.g. a command's config),
        then ``changes``; an unknown name in ``changes`` is a :class:`UserError`."""
        return settings_from(cls, options, changes, "train_continual")


@dataclass
class ContinualTask:
    """The embeddings of a task: training, test and key-fitting sets, classes and names."""

    embeddings: Path
    data: str
    backbone: str
    train: Any  # narrows.kvb.embeddings.Embeddings
    test: Any
    keys: Any
    classes: int
    class_names: list[str]


# -- the embedding store ----------------------------------------------------------------------
def load_task(embeddings: str | Path, *, data: str | None = None, backbone: str | None = None,
              key_data: str | None = None, key_split: str = "train",
              say: Callable[[str], Any] = print) -> ContinualTask:
    """The task's embeddings in the directory ``embeddings``: the train and test split of
    ``data`` through ``backbone`` (either inferred when it is the only one with both splits;
    the inferred data set is said), and the unlabelled key-fitting split ``key_split`` of
    ``key_data`` (default: ``data``)."""
    from narrows.kvb.embeddings import choose_embeddings, embedding_path, load_embeddings

    directory = Path(embeddings)
    if not directory.is_dir():
        raise UserError(f"no embedding directory {directory}",
                        "make it with 'narrows kvb embed --checkpoint FILE --data SPEC --out "
                        "DIR'")
    found = choose_embeddings(directory, data=data, backbone=backbone)
    if data is None:
        say(f"data: {found.data} (the embeddings in {directory})")
    data, backbone = found.data, found.backbone

    def get(spec: str, split: str) -> Any:
        path = embedding_path(directory, backbone, spec, split)
        return load_embeddings(path, data=spec, split=split, backbone=backbone)

    train, test = get(data, "train"), get(data, "test")
    key_data = key_data or data
    same = key_data == data and key_split == "train"
    keys = train if same else get(key_data, key_split)
    if key_data == data and key_split == "test":
        raise UserError("`key_split` test of the task's own data would fit the keys on the "
                        "test images", "use `key_split` train or another `key_data`")
    for other in (test, keys):
        if other.dim != train.dim:
            raise UserError(f"embeddings of dimension {other.dim} ({other.meta.data} "
                            f"{other.meta.split}) and {train.dim} ({data} train) do not mix",
                            "embed every data set through the same backbone")
    classes = _num_classes(train, test)
    return ContinualTask(directory, data, backbone, train, test, keys, classes,
                         _class_names(train, classes))


def _num_classes(train: Any, test: Any) -> int:
    names = train.meta.class_names
    classes = len(names) if names else int(max(train.labels.max(), test.labels.max())) + 1
    low = min(int(train.labels.min()), int(test.labels.min()))
    high = max(int(train.labels.max()), int(test.labels.max()))
    if low < 0 or high >= classes:
        raise UserError(f"labels {low}..{high} do not fit {classes} classes",
                        "embed a labelled split of the task's data")
    return classes


def _class_names(train: Any, classes: int) -> list[str]:
    names = list(train.meta.class_names)
    return [str(n) for n in names] if len(names) == classes else [str(c) for c in range(classes)]


def _per_class(labels: Any, classes: int) -> list[int]:
    """Images per class."""
    import torch

    return torch.bincount(labels, minlength=classes).tolist()


# -- defaults from the data -------------------------------------------------------------------
def resolve_settings(settings: ContinualSettings, task: ContinualTask,
                     say: Callable[[str], Any] = print
                     ) -> tuple[ContinualSettings, list[list[int]]]:
    """``settings`` with ``data`` and the data-dependent defaults filled in (and said) from the
    embeddings of ``task``, and the tasks (lists of class ids)."""
    from narrows.kvb.defaults import DIM_KEY, default_classes_per_task, divisors, scaled_defaults
    from narrows.kvb.protocols import make_tasks

    train, classes = task.train, task.classes
    chosen: list[str] = []
    per_task = settings.classes_per_task
    if per_task is None:
        try:
            per_task = default_classes_per_task(classes)
        except ValueError as exc:
            raise UserError(f"the embeddings hold {classes} class: {exc}",
                            "embed a data set with two or more classes") from None
        chosen.append(f"`classes_per_task` {per_task}")
    elif classes % per_task:
        fits = [d for d in divisors(classes) if d < classes] or [classes]
        raise UserError(f"{classes} classes cannot be cut into tasks of {per_task}",
                        f"pass `classes_per_task` {', '.join(map(str, fits))} (a divisor of "
                        f"{classes}), or leave it out to have it chosen")
    try:
        tasks = make_tasks(classes, per_task, settings.seed, settings.class_order)
    except ValueError as exc:
        raise UserError(str(exc), "pass a `class_order` that is a permutation of the class "
                        "ids 0..C-1") from None
    if settings.dim_key is not None and settings.dim_key > train.dim:
        raise UserError(f"`dim_key` {settings.dim_key} exceeds the {train.dim} dimensions of "
                        "the embeddings (each head projects them to a key)",
                        f"pass `dim_key` of at most {train.dim}, or leave it out for "
                        f"{min(DIM_KEY, train.dim)}")
    counts = _per_class(train.labels, classes)
    largest = max(sum(counts[c] for c in t) for t in tasks)
    scaled = scaled_defaults(per_task=largest, keys=len(task.keys), dim=train.dim,
                             batch_size=settings.batch_size)
    changes: dict[str, Any] = {"data": task.data, "classes_per_task": per_task}
    for name in ("epochs", "num_pairs", "dim_key", "init_epochs"):
        if getattr(settings, name) is None:
            changes[name] = getattr(scaled, name)
            chosen.append(f"`{name}` {changes[name]}")
    if chosen:
        say(f"defaults for {classes} classes, {len(train)} training and {len(task.keys)} key "
            f"embeddings: {', '.join(chosen)}")
    return dataclasses.replace(settings, **changes), tasks


# -- keys ---------------------------------------------------------------------------------------
def fit_key_layer(settings: ContinualSettings, task: ContinualTask, *, run: Any = None,
                  device: Any = "cpu", progress: bool = False,
                  say: Callable[[str], Any] = print) -> Any:
    """The key-value layer (a :class:`~narrows.kvb.KeyValueBottleneck`, values zero) with its
    keys fitted by EMA k-means on the unlabelled key embeddings of ``task``, built and fitted
    as ``settings`` (a :class:`ContinualSettings`) say; with a
    :class:`~narrows.runs.RunDir` ``run``, cached in its ``keys.pt`` (and ``keys.json``)."""
    from narrows.kvb import KeyValueBottleneck

    s = settings
    try:
        layer = KeyValueBottleneck(task.train.dim, s.num_books, s.num_pairs, s.dim_key,
                                   task.classes, topk=s.topk, splitting_mode=s.splitting_mode,
                                   decay=s.decay, threshold_factor=s.threshold_factor,
                                   seed=s.seed)
    except ValueError as exc:
        raise UserError(f"bad key-value bottleneck options: {exc}",
                        "see 'narrows kvb train --help'") from None
    layer = layer.to(device)
    file = run.file("keys.pt") if run is not None else None
    if file is not None and file.is_file():
        from narrows.runs.files import read_torch_file, reading

        state = read_torch_file(file, "cached keys file", map_location=device)
        with reading(file, "cached keys file"):
            layer.load_state_dict(state)
        say(f"keys fitted before ({file})")
        return layer
    keys = task.keys
    say(f"fitting {s.num_books} × {s.num_pairs} keys of dimension {s.dim_key} on "
        f"{len(keys)} unlabelled embeddings ({keys.meta.data} {keys.meta.split}), "
        f"{s.init_epochs} epochs")
    batches = _ShuffledBatches(keys.features.to(device), s.batch_size, s.seed)
    stats = layer.init_keys(batches, epochs=s.init_epochs, progress=progress)
    if run is not None and run.writer:
        from narrows.runs import atomic_torch_save

        atomic_torch_save(file, layer.state_dict())
        run.write_json("keys.json", _plain_stats(stats))
    return layer


class _ShuffledBatches:
    """Re-iterable mini-batches of a tensor, in a new seeded order at every pass."""

    def __init__(self, data: Any, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, 0

    def __iter__(self) -> Any:
        import torch

        from narrows.runtime import derive_seed

        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x6B, self.epoch))
        self.epoch += 1
        order = torch.randperm(len(self.data), generator=gen).to(self.data.device)
        for first in range(0, len(order), self.batch_size):
            yield self.data[order[first:first + self.batch_size]]


def _plain_stats(stats: Any) -> Any:
    if dataclasses.is_dataclass(stats):
        return {k: v for k, v in dataclasses.asdict(stats).items()
                if isinstance(v, (int, float, str, list, type(None)))}
    return str(stats)


# -- one model, one protocol --------------------------------------------------------------------
def _run_one(settings: ContinualSettings, name: str, protocol: str, tasks: list[list[int]],
             train: Any, test: Any, layer: Any, classes: int, device: Any,
             say: Callable[[str], Any]) -> Any:
    import time

    from narrows.kvb.learners import make_learner
    from narrows.kvb.protocols import make_stream, run_stream
    from narrows.runtime import format_duration

    began = time.perf_counter()
    stream = make_stream(protocol, train.labels, tasks, settings.epochs, settings.seed)
    learner, meta = make_learner(name, settings, train=(train.features, train.labels),
                                 test=test.features, classes=classes, layer=layer, device=device)
    say(f"{name}, {protocol}: {len(stream.phases)} phases, {stream.visits} sample visits in "
        f"batches of {settings.batch_size}")
    result = run_stream(learner, stream, test.labels, classes, model=name, meta=meta, log=say)
    result.meta["seconds"] = round(time.perf_counter() - began, 2)
    say(f"{name}, {protocol}: final accuracy {result.final_accuracy:.3f}, forgetting "
        f"{result.forgetting:.3f} [{format_duration(time.perf_counter() - began)}]")
    return result


# -- the result ---------------------------------------------------------------------------------
@dataclass
class ContinualRun:
    """Every model's :class:`~narrows.kvb.results.ContinualResult` of one task."""

    results: list[Any]
    settings: ContinualSettings
    tasks: list[list[int]]
    class_names: list[str]
    backbone: str
    path: Path | None = None

    def summary(self) -> str:
        """One line: final accuracy and forgetting per model and protocol."""
        return "; ".join(f"{r.model}/{r.protocol}: final {r.final_accuracy:.3f}, forgetting "
                         f"{r.forgetting:.3f}" for r in self.results) or "no results"

    def table(self) -> str:
        """The comparison table (Markdown): final accuracy and forgetting per model."""
        from narrows.kvb.results import comparison_table

        return comparison_table(self.results).rstrip()

    def flat(self) -> dict[str, Any]:
        """A flat summary: ``<model>/<protocol>.<score>`` for every number of every result's
        :meth:`~narrows.kvb.results.ContinualResult.scores` (the names ``narrows sweep`` gives
        the list-shaped results.json)."""
        from narrows.runs.sweep import flatten_results

        return {"summary": self.summary(), **flatten_results(self.scores(), None)}

    def scores(self) -> list[dict[str, Any]]:
        """Every result's scores, one entry per model and protocol (``results/*.json``; the
        run's ``results.json`` is their :meth:`flat` form)."""
        return [r.scores() for r in self.results]

    def to_rows(self) -> list[dict[str, Any]]:
        """One record per model, protocol, phase and task: its accuracy."""
        return [row for r in self.results for row in r.to_rows()]

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The comparison figure (final accuracy and forgetting per model) on its own axes, or
        the first result's accuracy per task on ``ax``. Returns ``(fig, ax)``."""
        from narrows.kvb.results import plot_comparison

        if ax is not None:  # one axes: the first result's accuracy curves
            return self.results[0].plot(ax)
        fig = plot_comparison(self.results)
        return fig, fig.axes

    def document(self) -> dict[str, Any]:
        """``continual.json``: the header, the tasks, class names, backbone and settings."""
        from narrows.kvb.results import FORMAT_VERSION
        from narrows.runs.results import header, provenance

        settings = dataclasses.asdict(self.settings)
        origin = provenance(model=self.backbone, data=self.settings.data,
                            seed=self.settings.seed, options=settings)
        return {**header(RUN_FORMAT_KIND, FORMAT_VERSION, origin), "tasks": self.tasks,
                "class_names": self.class_names, "backbone": self.backbone,
                "results": [f"results/{r.model}-{r.protocol}.json" for r in self.results]}

    @classmethod
    def load(cls, path: str | Path) -> ContinualRun:
        """The run saved in the directory ``path`` (by :meth:`save` or ``narrows kvb train``);
        directories without ``continual.json`` (older runs) are read from results.json."""
        from narrows.kvb.results import FORMAT_VERSION, ContinualResult
        from narrows.runs.files import read_json_file
        from narrows.runs.results import check_header

        path = Path(path)
        doc: dict[str, Any] = {}
        if (path / RUN_FILE).is_file():
            doc = read_json_file(path / RUN_FILE, "kvb run file", kind=dict)
            check_header(doc, RUN_FORMAT_KIND, FORMAT_VERSION, str(path / RUN_FILE))
            files = [path / f for f in doc.get("results", [])]
        else:
            files = [path / "results" / f"{m}-{p}.json" for m, p in result_names(
                read_json_file(path / "results.json", "kvb results file"))]
        results = [ContinualResult.load(f) for f in files]
        options = doc.get("provenance", {}).get("options", {})
        known = {f.name for f in dataclasses.fields(ContinualSettings)}
        settings = ContinualSettings(**{k: v for k, v in options.items() if k in known})
        first = results[0] if results else None
        tasks = doc.get("tasks", first.tasks if first else [])
        names = doc.get("class_names", first.class_names() if first else [])
        return cls(results, settings, tasks, list(names), str(doc.get("backbone", "")), path)

    def save(self, run: Any) -> None:
        """Write table.csv, table.md, accuracy_matrix.csv, results.json (one summary per model
        and protocol), comparison.png and accuracy_matrices.png into ``run`` (a
        :class:`~narrows.runs.RunDir` or a directory)."""
        from narrows.kvb.results import comparison_table, plot_matrices, summary_table
        from narrows.kvb.results import plot_comparison as comparison
        from narrows.plotting import pyplot
        from narrows.runs import RunDir

        run = run if isinstance(run, RunDir) else RunDir(run)
        if not run.writer or not self.results:
            return
        csv, md = summary_table(self.results)
        run.write_text("table.csv", csv)
        run.write_text("table.md", comparison_table(self.results) + "\n" + md)
        run.write_text("accuracy_matrix.csv", _long_csv(self.results))
        for r in self.results:
            if not run.exists(f"results/{r.model}-{r.protocol}.json"):
                run.write_json(f"results/{r.model}-{r.protocol}.json", r.document())
        run.write_json(RUN_FILE, self.document())
        for name, fig in (("comparison.png", comparison(self.results)),
                          ("accuracy_matrices.png", plot_matrices(self.results))):
            run.save_figure(name, fig)
            pyplot().close(fig)
        run.write_json("results.json", self.flat())  # last: it marks a finished run


RUN_FILE, RUN_FORMAT_KIND = "continual.json", "kvb.run"


def result_names(results: Any) -> list[tuple[str, str]]:
    """The (model, protocol) pairs of a run's results.json, list-shaped (one entry per model
    and protocol) or flat (``<model>/<protocol>.<score>`` keys)."""
    if isinstance(results, list):
        return [(str(r["model"]), str(r["protocol"])) for r in results
                if isinstance(r, dict) and "model" in r and "protocol" in r]
    if isinstance(results, dict):
        pairs = [tuple(k.split(".", 1)[0].split("/", 1)) for k in results if "/" in k]
        return list(dict.fromkeys(p for p in pairs if len(p) == 2))  # type: ignore[misc]
    return []


def _long_csv(results: list[Any]) -> str:
    import csv
    import io

    rows = [row for r in results for row in r.to_rows()]
    header = ["model", "protocol", "after_phase", "task", "classes", "accuracy"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([f"{row[h]:.4f}" if h == "accuracy" else str(row[h]) for h in header]
                     for row in rows)
    return text.getvalue()


# -- the whole run ------------------------------------------------------------------------------
OpenRun = Callable[[ContinualSettings, ContinualTask], Any]


def train_continual(embeddings: str | Path, settings: ContinualSettings | None = None, *,
                    run: Any = None, device: Any = "cpu", progress: bool = False,
                    say: Callable[[str], Any] = print, options: Any = None,
                    **changes: Any) -> ContinualRun:
    """Train every model of ``settings.model`` on the class-incremental stream and/or the
    i.i.d. control (``settings.protocol``) of the embeddings in the directory ``embeddings``.

    ``settings`` (default: :class:`ContinualSettings`; or, by name, ``options``: a
    :class:`~narrows.kvb.options.ContinualOptions` or any object with its attributes, such as
    the command's config), then ``changes`` by name (e.g. ``model=["dkvb", "linear"],
    epochs=5``); unset options come from the embeddings.
    ``run``: a :class:`~narrows.runs.RunDir`, or a callable ``(resolved settings, task) ->
    RunDir`` (so the resolved options can be recorded) — the fitted keys and each model's
    result are cached there and reused when the run is repeated; ``None`` keeps nothing.
    The tables and figures are written by :meth:`ContinualRun.save`. The run's ``logger``
    (see :meth:`RunDir.attach_logger`) gets each newly trained model's accuracies and mean
    loss after every phase (:func:`log_result`); it is closed when this returns or fails.
    """
    resolved: list[Any] = []
    try:
        return _train_continual(embeddings, settings, run=run, device=device, progress=progress,
                                say=say, options=options, changes=changes, resolved=resolved)
    finally:
        for opened in resolved:
            opened.close()


def log_result(logger: Any, result: Any) -> None:
    """Log a :class:`~narrows.kvb.results.ContinualResult` to ``logger``: after each phase
    (the step), under ``<model>-<protocol>/``, the accuracy on each task's classes
    (``task<i>``, 1-based), on all classes and the phase's mean loss; at the last phase, under
    ``final/<model>-<protocol>/``, the final accuracy, forgetting and per-task accuracies."""
    if not logger.active:
        return
    import numpy as np

    prefix = f"{result.model}-{result.protocol}"
    matrix = result.matrix()
    for t in range(result.num_phases):
        values = {f"task{s + 1}": matrix[t, s] for s in range(matrix.shape[1])}
        with np.errstate(all="ignore"):
            values["accuracy"] = float(np.nanmean(result.per_class[t]))
        values["mean_loss"] = result.meta.get(f"mean_loss_phase{t + 1}")
        logger.scalars(values, t + 1, prefix=prefix)
    final = {f"task{s + 1}": matrix[-1, s] for s in range(matrix.shape[1])}
    final.update(accuracy=result.final_accuracy, forgetting=result.forgetting,
                 balanced_accuracy=result.balanced_accuracy)
    logger.scalars(final, result.num_phases, prefix=f"final/{prefix}")


def _train_continual(embeddings: str | Path, settings: ContinualSettings | None, *, run: Any,
                     device: Any, progress: bool, say: Callable[[str], Any], options: Any,
                     changes: dict[str, Any], resolved: list[Any]) -> ContinualRun:
    import torch

    from narrows.kvb.registry import LEARNERS, MODEL_NAMES
    from narrows.kvb.results import ContinualResult

    if settings is not None and options is not None:
        raise UserError("both `settings` and `options` given", "pass one of them")
    s = ContinualSettings.from_options(settings if settings is not None else options, **changes)
    unknown = [m for m in s.model if m not in MODEL_NAMES]
    if unknown:
        raise UserError(f"unknown `model` {unknown[0]!r}", f"use one of: {', '.join(MODEL_NAMES)}")
    task = load_task(embeddings, data=s.data, backbone=s.backbone, key_data=s.key_data,
                     key_split=s.key_split, say=say)
    s, tasks = resolve_settings(s, task, say)
    if callable(run):
        run = run(s, task)
    if run is not None:
        resolved.append(run)
    names, train, test = task.class_names, task.train, task.test
    shown = " ".join("(" + ", ".join(names[c] for c in t) + ")" for t in tasks)
    where = f" → {run.path}" if run is not None else ""
    say(f"{task.classes} classes in {len(tasks)} tasks of {s.classes_per_task}: {shown}; "
        f"{len(train)} training and {len(test)} test embeddings of dimension {train.dim} "
        f"({task.backbone}){where}")
    layer = None
    if any(LEARNERS[m].uses_keys for m in s.model):
        layer = fit_key_layer(s, task, run=run, device=device, progress=progress, say=say)
    results = []
    for protocol in dict.fromkeys(s.protocol):
        for name in dict.fromkeys(s.model):
            file = run.file(f"results/{name}-{protocol}.json") if run is not None else None
            if file is not None and file.is_file():
                say(f"{name}, {protocol}: done before ({file})")
                results.append(ContinualResult.load(file))
                continue
            with torch.random.fork_rng(devices=[]):
                result = _run_one(s, name, protocol, tasks, train, test, layer, task.classes,
                                  device, say)
            result.meta["class_names"] = list(names)
            if run is not None:
                log_result(run.logger, result)
            if file is not None and run.writer:
                result.save(file)
            results.append(result)
    return ContinualRun(results, s, tasks, list(names), task.backbone,
                        run.path if run is not None else None)

