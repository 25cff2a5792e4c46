"""The cascading model-parameter randomisation check of several methods, cached per method.

:func:`sanity_check` is ``narrows attribution sanity`` as a function: each method's
:class:`~narrows.attribution.metrics.RandomisationResult` is cached in ``sanity_<method>.pt``
of a :class:`~narrows.runs.RunDir`; the table goes to sanity.csv and sanity.md, the curves to
sanity.png, the flat summary to results.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from narrows.attribution.methods import MethodSettings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from narrows.attribution.metrics import RandomisationResult
    from narrows.runs import RunDir

__all__ = ["SanityResult", "sanity_check"]

FORMAT_KIND = "attribution_sanity"  # saved files: "format": narrows.attribution_sanity/1


@dataclass
class SanityResult:
    """Each method's randomisation result, the Markdown table and the files written."""

    results: dict[str, Any]
    table: str = ""
    files: list[Path] = field(default_factory=list)

    def to_rows(self) -> list[dict[str, Any]]:
        """One record per method and randomisation step."""
        return [{"method": m, **row} for m, r in self.results.items() for row in r.to_rows()]

    def summary(self) -> str:
        """One line: each method's randomisation summary (the full table is :attr:`table`)."""
        return "; ".join(f"{method}: {result.summary()}" for method, result in
                         self.results.items())

    def headline(self) -> dict[str, float | None]:
        """The flat numbers of ``results.json``, per method: Spearman ρ and SSIM once every
        layer is randomised (``"<method>.spearman_final"``, ``"<method>.ssim_final"``) and the
        run-to-run Spearman ρ (``"<method>.spearman_run_to_run"``)."""
        found: dict[str, float | None] = {}
        for method, result in self.results.items():
            rows = result.to_rows()
            final, floor = rows[-1], rows[0]
            found[f"{method}.spearman_final"] = float(final["spearman_mean"])
            found[f"{method}.ssim_final"] = float(final["ssim_mean"])
            found[f"{method}.spearman_run_to_run"] = float(floor["spearman_mean"])
        return found

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Every method's Spearman ρ and SSIM curves on two axes (``ax``: a pair of axes, or
        None for a new figure); returns ``(fig, axes)``."""
        if ax is None:
            from narrows.plotting import pyplot

            _, ax = pyplot().subplots(1, 2, figsize=(10, 4), sharex=True)
        for index, (method, result) in enumerate(self.results.items()):
            result.plot(ax, label=method, color=f"C{index % 10}")
        return ax[0].figure, ax

    def save(self, path: str | Path) -> Path:
        """Write every method's randomisation result, the table and the file list to one torch
        file, after the format header."""
        from dataclasses import fields

        from narrows.attribution.result_files import save_torch_result
        from narrows.runs.results import provenance

        state = {"results": {m: {f.name: getattr(r, f.name) for f in fields(r)}
                             for m, r in self.results.items()},
                 "table": self.table, "files": [str(f) for f in self.files]}
        seeds = {r.seed for r in self.results.values()}
        origin = provenance(seed=next(iter(seeds)) if len(seeds) == 1 else None,
                            options={"methods": list(self.results)})
        return save_torch_result(path, FORMAT_KIND, state, origin)

    @classmethod
    def load(cls, path: str | Path) -> SanityResult:
        """Read a result written by :meth:`save`."""
        from narrows.attribution.metrics import RandomisationResult
        from narrows.attribution.result_files import load_torch_result
        from narrows.runs.files import reading

        what, fix = "sanity result file", "delete it and run the sanity check again"
        state = load_torch_result(path, FORMAT_KIND, what, fix)
        with reading(path, what, fix):
            return cls(results={m: RandomisationResult(**r) for m, r in state["results"].items()},
                       table=str(state.get("table", "")),
                       files=[Path(f) for f in state.get("files", [])])


def _iba(settings: MethodSettings, net: nn.Module, stats: Any, estimate: Any, run: RunDir,
         probe: torch.Tensor):
    """IBA as ``attribute(model, inputs, targets)``, re-estimating statistics when needed.

    Once a layer at or below the bottleneck is re-initialised, the bottleneck sees other
    features, so IBA is given statistics of the randomised model (``estimate(model, path)``,
    saved as statistics_randomised_<k>.pt). A change is detected by the bottleneck's output on
    ``probe``.
    """
    import torch

    from narrows.attribution.evaluation import _attribute
    from narrows.attribution.layers import default_layer, run_to_layer

    layer = settings.layer or default_layer(net)

    def features(model) -> torch.Tensor:
        with torch.no_grad():
            return run_to_layer(model, layer, probe).cpu()

    known = [(features(net), stats)]

    def attribute(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen = features(model)
        match = next((s for f, s in known if f.shape == seen.shape
                      and torch.allclose(f, seen, rtol=1e-4, atol=1e-6)), None)
        if match is None:
            match = estimate(model, run.file(f"statistics_randomised_{len(known)}.pt"))
            known.append((seen, match))
        return torch.from_numpy(_attribute("iba", model, inputs, targets, settings,
                                           match).heatmaps)

    return attribute


def _baseline(method: str, settings: MethodSettings):
    """A baseline as ``attribute(model, inputs, targets)``."""
    import torch

    from narrows.attribution.evaluation import _attribute

    def attribute(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(_attribute(method, model, inputs, targets, settings,
                                           None).heatmaps)

    return attribute


def cached_result(run: RunDir, method: str, indices: list[int]) -> RandomisationResult | None:
    """``method``'s result cached in ``run`` if it is of ``indices``, else None."""
    from narrows.attribution.metrics import RandomisationResult

    path = run.file(f"sanity_{method}.pt")
    if not path.is_file():
        return None
    result = RandomisationResult.load(path)
    return result if result.meta.get("indices") == indices else None


def sanity_check(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 indices: list[int], methods: list[str], layers: list[str] | None,
                 out: RunDir, *,
                 settings: MethodSettings | None = None, statistics: Any = None,
                 estimate: Any = None, repeats: int | None = None, progress: bool = True,
                 name: str = "model", n_samples: int | None = None, log: Any = print,
                 options: Any = None, normalizer: Any = None,
                 command: str = "attribution sanity") -> SanityResult:
    """Cascading randomisation of ``layers`` (top first; None: the model's top-level children
    with parameters, last called first) for each of ``methods`` on ``inputs`` (N, C, H, W;
    dataset ``indices``) towards ``labels``; ``repeats`` runs on the
    unmodified model give the noise floor. Results are cached in ``out`` (methods done are
    skipped). IBA needs ``statistics`` (or a function returning them, called only when IBA
    has work left) and ``estimate(model, path)`` to re-estimate them on a randomised model
    (on at most ``n_samples`` images, as ``log`` says with the cost). ``name`` is the model in
    titles. Returns a :class:`SanityResult`. ``options`` (a
    :class:`~narrows.attribution.options.SanityOptions`, or the command's config) gives
    ``repeats`` if None and, without ``settings``, the methods' settings; the rest default as
    ``narrows attribution sanity`` does. With ``normalizer`` (a Normalizer, callable or
    ``Subject``) ``inputs`` are [0, 1] images, normalised first. The flat ``results.json``
    (:func:`~narrows.runs.results.flat_summary`) names ``command`` (the run's command)."""
    if n_samples is None:
        from narrows.attribution.statistics import DEFAULT_N_SAMPLES

        n_samples = DEFAULT_N_SAMPLES
    import narrows.attribution.metrics as metric_functions
    from narrows.attribution.inputs import as_normalizer, model_inputs
    from narrows.attribution.options import SanityOptions, pick

    repeats = pick(options, SanityOptions, repeats=repeats)["repeats"]
    settings = settings or MethodSettings.from_options(options, getattr(options, "seed", 0))
    inputs = model_inputs(inputs, as_normalizer(normalizer))
    if layers is None:
        layers = metric_functions.cascade_layers(model, inputs[:1])
    results = {m: cached_result(out, m, indices) for m in methods}
    todo = [m for m in methods if results[m] is None]
    per_method = len(indices) * (repeats + len(layers))
    log(f"{name}: {len(methods)} methods ({len(todo)} to do) × {len(indices)} images × "
        f"({repeats} runs + {len(layers)} randomised steps: {' → '.join(layers)}) = "
        f"{per_method * len(todo):,} heatmaps to compute"
        + (f"; IBA {settings.steps} steps × {settings.iba_batch} samples each, statistics "
           f"re-estimated ({n_samples:,} images at most) once the bottleneck's input changes"
           if "iba" in todo else ""))
    if "iba" in todo and callable(statistics):
        statistics = statistics()
    for method in todo:
        attribute = (_iba(settings, model, statistics, estimate, out, inputs[:1])
                     if method == "iba" else _baseline(method, settings))
        result = metric_functions.cascading_randomisation(
            model, attribute, inputs, labels, layers=layers, seed=settings.seed,
            repeats=repeats, batch_size=1 if method == "iba" else 8, progress=progress,
            description=method)
        result.meta = {"method": method, "indices": indices}
        result.save(out.file(f"sanity_{method}.pt"))
        results[method] = result
    table = write_sanity(out, results, subject=f"{name}, {len(indices)} images")
    result = SanityResult(results=results, table=table, files=[
        out.file("sanity.csv"), out.file("sanity.md"), out.file("sanity.png"),
        out.file("results.json")])
    from narrows.runs.results import flat_summary

    out.write_json("results.json", flat_summary(result, command=command))
    return result


def write_sanity(run: RunDir, results: dict[str, RandomisationResult],
                 subject: str | None = None) -> str:
    """Write sanity.csv, sanity.md and sanity.png (only what changed); return the table."""
    import csv
    import io

    from narrows.plotting import pyplot

    rows = [{"method": method, **row} for method, result in results.items()
            for row in result.to_rows()]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    def cell(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "–"
        return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")

    lines = ["| method | randomised down to | Spearman ρ | SSIM | images |",
             "|---|---|---|---|---|"]
    for row in rows:
        where = row["randomised_to"] or "none (run-to-run)"
        lines.append(f"| {row['method']} | {where} | {cell(row['spearman_mean'], row['spearman_std'])}"
                     f" | {cell(row['ssim_mean'], row['ssim_std'])} | {row['n_images']} |")
    table = "\n".join(lines) + "\n"
    csv_text = text.getvalue()
    unchanged = (run.exists("sanity.csv") and run.file("sanity.csv").read_text() == csv_text
                 and run.exists("sanity.md") and run.exists("sanity.png"))
    if unchanged:
        return table
    run.write_text("sanity.csv", csv_text)
    run.write_text("sanity.md", table)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for index, (method, result) in enumerate(results.items()):
        result.plot(axes, label=method, color=f"C{index % 10}")
    fig.suptitle("cascading randomisation: original vs randomised heatmaps"
                 + (f"\n{subject}" if subject else ""), fontsize=10)
    fig.tight_layout()
    run.save_figure("sanity.png", fig)
    plt.close(fig)
    return table

