"""The toy experiment of Figure 2 as one resumable run: :func:`run_toy` returns a :class:`ToyRun`
(every seed's :class:`~narrows.kvb.toy.SeedResult` and their summary), which saves toy.csv,
toy.md, toy.png and results.json.

With a :class:`~narrows.runs.RunDir`, each seed's result is saved as soon as it is trained
(``seeds/seed<N>.json`` and ``seeds/seed<N>_maps.pt``) and loaded instead of retrained when the
run is repeated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from narrows.config import settings_from
from narrows.kvb.options import DEFAULT_SEEDS, ToyOptions  # noqa: F401  (re-exported)

RESULTS = "results.json"
RUN_FILE = "toy.json"
FORMAT_KIND, FORMAT_VERSION = "kvb.toy", 1


@dataclass
class ToySettings(ToyOptions):
    """The options of :func:`run_toy`, with the command line's defaults (``narrows kvb toy
    --help`` explains each; the flag is the name with dashes)."""

    @classmethod
    def from_options(cls, options: Any = None, **changes: Any) -> ToySettings:
        """Settings from the same-named attributes of ``options`` (e.g. a command's config),
        then ``changes``."""
        return settings_from(cls, options, changes, "run_toy")


@dataclass
class ToyRun:
    """Every seed's result of the toy experiment and their summary over seeds."""

    settings: ToySettings
    results: list[Any]  # narrows.kvb.toy.SeedResult, in the order of the seeds
    summary_by_model: dict[str, dict[str, Any]]

    def summary(self) -> str:
        """One line: every model's final 8-class accuracy (mean over the seeds)."""
        return (f"toy, {len(self.results)} seed(s): final accuracy " + ", ".join(
            f"{key} {s['final_mean']:.3f}" for key, s in self.summary_by_model.items()))

    def table(self) -> str:
        """The summary table (Markdown): final accuracy, task 1, per class, pairs used."""
        from narrows.kvb import toy

        return toy.summary_table(self.summary_by_model)

    def to_rows(self) -> list[dict[str, Any]]:
        """One record per model, pruning, seed and moment (the rows of toy.csv)."""
        from narrows.kvb import toy

        return toy.csv_rows(self.results)

    def flat(self) -> dict[str, Any]:
        """results.json, a flat summary: ``final_<model>``, ``final_std_<model>``,
        ``task1_after1_<model>``, ``task1_end_<model>`` and ``used_<model>`` (over seeds) and
        the seeds; the full summary is in toy.md and toy.csv."""
        flat: dict[str, Any] = {}
        for key, s in self.summary_by_model.items():
            flat[f"final_{key}"] = s["final_mean"]
            flat[f"task1_end_{key}"] = s["task1_end"]
        for key, s in self.summary_by_model.items():
            flat[f"final_std_{key}"] = s["final_std"]
            flat[f"task1_after1_{key}"] = s["task1_after1"]
            flat[f"used_{key}"] = s["used"]
        return {"summary": self.summary(), **flat, "seeds": [r.seed for r in self.results]}

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The decision maps of every model and stage for the first seed (a grid of its own
        axes), or the first seed's final accuracy per model on ``ax``. Returns ``(fig, ax)``."""
        from narrows.kvb import toy

        if ax is not None:
            return self.results[0].plot(ax)
        first, cfg = self.results[0], self.settings
        labels = {ev.model: ev.label for ev in first.evaluations}
        fig = toy.decision_figure(first.maps, toy.make_data(first.seed, cfg.train_points,
                                                            cfg.test_points), labels)
        return fig, fig.axes

    def save(self, run: Any) -> None:
        """Write toy.csv, toy.md, toy.png and results.json into ``run`` (a
        :class:`~narrows.runs.RunDir` or a directory)."""
        from narrows.kvb import toy
        from narrows.plotting import pyplot
        from narrows.runs import RunDir
        from narrows.runs.sweep import csv_table

        run = run if isinstance(run, RunDir) else RunDir(run)
        cfg, results, summary = self.settings, self.results, self.summary_by_model
        run.write_text("toy.csv", csv_table(self.to_rows()))
        seeds = ", ".join(str(r.seed) for r in results)
        run.write_text("toy.md", (
            f"# Toy experiment (Figure 2): {len(results)} seed(s) ({seeds}), {cfg.steps} steps "
            f"per stage, {cfg.train_points} training and {cfg.test_points} test points per "
            "stage\n\n"
            "Class-balanced accuracy on all 8 classes after stage 4 (mean ± std over seeds), "
            "accuracy on stage 1's classes right after stage 1 and at the end, per-class "
            "accuracy at the end, fraction of key-value pairs ever fetched.\n\n"
            f"{toy.summary_table(summary)}\n\n"
            "Accuracy on each task's classes after each stage (mean over seeds):\n\n"
            f"{toy.matrix_table(summary)}\n"))
        fig, _ = self.plot()
        run.save_figure("toy.png", fig)
        pyplot().close(fig)
        for result in results:  # run_toy saved them already when given the run
            if not (run.exists(f"seeds/seed{result.seed}.json")
                    and run.exists(f"seeds/seed{result.seed}_maps.pt")):
                _save_seed(run, result)
        run.write_json(RUN_FILE, self.document())
        run.write_json(RESULTS, self.flat())  # last: it marks a finished run

    def document(self) -> dict[str, Any]:
        """``toy.json``: the header (the settings as options) and the seeds."""
        import dataclasses

        from narrows.runs.results import header, provenance

        origin = provenance(data="toy", options=dataclasses.asdict(self.settings))
        return {**header(FORMAT_KIND, FORMAT_VERSION, origin),
                "seeds": [r.seed for r in self.results]}

    @classmethod
    def load(cls, path: Any) -> ToyRun:
        """The run saved in the directory ``path`` (its ``seeds/`` files, settings from
        ``toy.json``, else the seeds of results.json with default settings)."""
        from pathlib import Path

        from narrows.kvb import toy
        from narrows.runs import RunDir
        from narrows.runs.files import read_json_file
        from narrows.runs.results import check_header

        path = Path(path)
        run = RunDir(path, writer=False)
        if (path / RUN_FILE).is_file():
            doc = read_json_file(path / RUN_FILE, "toy run file", kind=dict)
            check_header(doc, FORMAT_KIND, FORMAT_VERSION, str(path / RUN_FILE))
            settings = ToySettings.from_options(None, **doc.get("provenance", {}).get(
                "options", {}))
        else:
            doc = read_json_file(path / RESULTS, "toy results file", kind=dict)
            settings = ToySettings(seeds=[int(seed) for seed in doc.get("seeds", [])])
        results = [load_seed(run, f"seeds/seed{int(seed)}") for seed in doc.get("seeds", [])]
        return cls(settings, results, toy.summarise(results))


def run_toy(settings: ToySettings | None = None, *, run: Any = None, threads: int = 1,
            say: Callable[[str], Any] = print, **options: Any) -> ToyRun:
    """Train the toy experiment's models for every seed (the seeds of a model in lockstep, on
    ``threads`` CPU threads); ``settings`` then ``options`` by name (e.g. ``seeds=[0],
    steps=200``). With a :class:`~narrows.runs.RunDir` ``run``, seeds finished before are
    loaded and each new one is saved as soon as it is trained."""
    from narrows.kvb import toy

    cfg = ToySettings.from_options(settings, **options)
    seeds = list(dict.fromkeys(cfg.seeds))
    done = {}
    if run is not None:
        done = {seed: load_seed(run, f"seeds/seed{seed}") for seed in seeds
                if run.exists(f"seeds/seed{seed}.json")
                and run.exists(f"seeds/seed{seed}_maps.pt")}
    if done:
        say(f"  seed(s) {', '.join(map(str, done))}: finished before, loaded")
    todo = [seed for seed in seeds if seed not in done]
    if todo:
        say(f"  training seed(s) {', '.join(map(str, todo))} (the seeds of a model in lockstep)")
        for result in toy.run_seeds(todo, cfg.models, steps=cfg.steps,
                                    train_points=cfg.train_points, test_points=cfg.test_points,
                                    key_batches_count=cfg.key_batches, decay=cfg.decay,
                                    kv_lr=cfg.kv_lr, resolution=cfg.resolution,
                                    threads=threads):
            if run is not None:
                _save_seed(run, result)
            done[result.seed] = result
    results = [done[seed] for seed in seeds]
    return ToyRun(cfg, results, toy.summarise(results))


def _save_seed(run: Any, result: Any) -> None:
    from narrows import runs

    stem = f"seeds/seed{result.seed}"
    if run.writer:
        runs.atomic_torch_save(run.file(f"{stem}_maps.pt"), result.maps)
    run.write_json(f"{stem}.json", result.document())


def load_seed(run: Any, stem: str) -> Any:
    """The :class:`~narrows.kvb.toy.SeedResult` saved as ``stem``.json and ``stem``_maps.pt
    in ``run``; a damaged file is a :class:`~narrows.errors.UserError` naming it."""
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
