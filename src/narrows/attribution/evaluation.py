"""Compare attribution methods: heatmaps per method, then degradation, bbox and sensitivity-n.

:func:`evaluate_methods` is ``narrows attribution evaluate`` as a function. It caches into a
:class:`~narrows.runs.RunDir`: each method's heatmaps in ``heatmaps_<method>.npz`` (with the
image indices), each metric in ``metric_<method>_<metric>.json``; it writes results.csv,
results.md, degradation.png, examples.png, (with sensitivity-n) sensitivity_n.png,
evaluation.json and the flat ``results.json`` (:func:`~narrows.runs.results.flat_summary`). Both
caches carry the result header (:func:`narrows.runs.results.header`: ``narrows.<kind>/1`` and
the provenance; the npz as a JSON string in its ``header`` array); caches written before
headers existed still load.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from narrows.attribution.methods import MethodSettings
from narrows.attribution.report import (
    EXAMPLES,
    draw_examples,
    draw_sensitivity,
    nanmean,
    write_results,
)
from narrows.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from narrows.runs import RunDir

__all__ = ["DEFAULT_METRICS", "METRICS", "EvaluationResult", "evaluate_methods",
           "resolve_metrics"]

METRICS = ("degradation", "bbox", "sensitivity-n")
DEFAULT_METRICS = ("degradation", "bbox")
FORMAT_KIND = "attribution_evaluation"  # saved files: "format": narrows.attribution_evaluation/1
HEATMAPS_KIND = "attribution_heatmaps"  # heatmaps_<method>.npz
METRIC_KIND = "attribution_metric"  # metric_<method>_<metric>.json
RESULT_FILE = "evaluation.json"  # the EvaluationResult of a run directory


@dataclass
class EvaluationResult:
    """One row per method (its metrics), the mean degradation curves per method, the
    Markdown table and the files written."""

    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    table: str = ""
    files: list[Path] = field(default_factory=list)
    tile: int | None = None

    def to_rows(self) -> list[dict[str, Any]]:
        """The results table as flat records."""
        return [dict(row) for row in self.rows]

    def summary(self) -> str:
        """One line: each method's numbers (the full table is :attr:`table`)."""
        def numbers(row: dict[str, Any]) -> str:
            return ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                             if isinstance(v, float) and k != "method")

        return "; ".join(f"{row.get('method', '?')}: {numbers(row)}" for row in self.rows)

    def headline(self) -> dict[str, float | int | None]:
        """The flat numbers of ``results.json``: each method's metrics as ``"<method>.<column>"``
        (``iba.degradation_tile8``, ``random.bbox_ratio``...)."""
        return {f"{row.get('method', '?')}.{key}": value
                for row in self.rows for key, value in row.items()
                if key != "method" and isinstance(value, numbers.Real)
                and not isinstance(value, bool)}

    def plot(self, ax: Any = None, subject: str | None = None) -> tuple[Any, Any]:
        """Each method's mean MoRF and LeRF curves (degradation.png); returns ``(fig, ax)``."""
        from narrows.attribution.report import draw_degradation

        if ax is None:
            from narrows.plotting import pyplot

            _, ax = pyplot().subplots(figsize=(5.5, 3.8))
        draw_degradation(ax, self.curves, self.tile, subject)
        return ax.figure, ax

    def save(self, path: str | Path) -> Path:
        """Write the rows, curves, table and file list to one JSON file, after the header."""
        from narrows.attribution.result_files import save_json_result
        from narrows.runs.results import provenance

        state = {"rows": self.rows, "curves": self.curves, "table": self.table,
                 "files": [str(f) for f in self.files], "tile": self.tile}
        origin = provenance(options={"tile": self.tile} if self.tile is not None else None)
        return save_json_result(path, FORMAT_KIND, state, origin)

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        """Read a result written by :meth:`save` (``path`` may be the evaluation's directory)."""
        from narrows.attribution.result_files import load_json_result
        from narrows.runs.files import reading

        what, fix = "attribution evaluation file", "delete it and run the evaluation again"
        if Path(path).is_dir():
            path = Path(path) / RESULT_FILE
        state = load_json_result(path, FORMAT_KIND, what, fix, required_keys=("rows",))
        with reading(path, what, fix):
            return cls(rows=list(state["rows"]), curves=dict(state.get("curves", {})),
                       table=str(state.get("table", "")),
                       files=[Path(f) for f in state.get("files", [])], tile=state.get("tile"))


def resolve_metrics(dataset: Any, spec: str, metrics: list[str] | None = None,
                    names: dict[str, str] | None = None) -> list[str]:
    """The metrics to compute (``None``: the default ones). Without boxes, the default list
    drops bbox with a note and an explicit ``bbox`` is a :class:`UserError`."""
    from narrows.data import dataset_has_boxes
    from narrows.notes import note_once

    chosen = list(metrics if metrics is not None else DEFAULT_METRICS)
    if "bbox" in chosen and not dataset_has_boxes(dataset):
        if metrics is not None:
            flag = (names or {}).get("metrics", "metrics")
            raise UserError(f"{spec} has no bounding boxes for the bbox metric",
                            f"drop bbox from {flag}, or use data with boxes (shapes, or "
                            "imagenet:/folder: with VOC XML box files beside the images)")
        chosen.remove("bbox")
        note_once("no-boxes", f"{spec} has no object boxes, so the bbox metric is skipped "
                  "(boxes: shapes, or VOC XML files beside imagenet:/folder: images)")
    return chosen


def check_tile(tile: int, size: tuple[int, int], metrics: list[str],
               names: dict[str, str] | None = None) -> None:
    """Raise unless ``tile`` leaves at least two tiles of ``size`` images for the metrics
    that remove tiles one by one."""
    h, w = size
    if {"degradation", "sensitivity-n"} & set(metrics) and math.ceil(h / tile) * math.ceil(
            w / tile) < 2:
        flag = (names or {}).get("tile", "tile")
        raise UserError(f"{flag} {tile} leaves one tile of the {h}×{w} images, and "
                        "degradation and sensitivity-n remove tiles one by one",
                        f"pass {flag} of at most {math.ceil(max(h, w) / 2)}")


def progress_bar(items: Any, progress: bool, desc: str) -> Any:
    """``items`` behind a tqdm bar (shown on a terminal when ``progress``)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=None if progress else True, leave=False)


def _attribute(method: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               settings: MethodSettings, stats: Any = None, record_steps: bool = False,
               ids: list[int] | None = None) -> Any:
    """An :class:`AttributionResult` of ``method`` for a batch of normalised ``inputs``.

    ``ids`` (the images' dataset indices) key each image's random draws on ``(seed, id)``,
    so a heatmap does not depend on the images explained before it (IBA's noise; the seed of
    random and SmoothGrad, given one image at a time). Without ``ids`` IBA uses the global RNG
    and the baselines their default seed.
    """
    explainer = settings.build(method, model, stats, record_steps=record_steps,
                               seeded=ids is not None)
    return explainer.attribute(inputs, targets, ids=ids)


def evaluate_methods(model: nn.Module, dataset: Any, indices: list[int], methods: list[str],
                     out: RunDir, *, normalizer: Any, settings: MethodSettings | None = None,
                     statistics: Any = None, metrics: list[str] | None = None,
                     tile: int | None = None, points: int | None = None,
                     n_sets: int | None = None, eval_batch_size: int | None = None,
                     device: Any = None, progress: bool = True, class_names: Any = None,
                     name: str = "model", log: Any = print, options: Any = None,
                     command: str = "attribution evaluate") -> EvaluationResult:
    """Compute each of ``methods``' heatmaps of the ``indices`` images of ``dataset`` (towards
    their labels), then each of ``metrics`` (default: degradation and bbox), caching both in
    ``out``; write the results table and figures there.

    ``normalizer`` maps the data set's images to model inputs; ``settings`` holds the methods'
    options and the seed; IBA needs ``statistics``. ``name`` is the model in titles and
    ``log`` prints the cost line; ``class_names`` name the classes in messages and figures.
    Returns an :class:`EvaluationResult`. ``options`` (an
    :class:`~narrows.attribution.options.EvaluateOptions`, or the command's config) gives
    ``tile``, ``points``, ``n_sets`` and ``eval_batch_size`` where they are None and, without
    ``settings``, the methods' settings; the rest default as ``narrows attribution evaluate``.
    The flat ``results.json`` names ``command`` (the run's command).
    """
    import numpy as np

    from narrows.attribution.images import describe_images, image_batch
    from narrows.attribution.options import EvaluateOptions, pick
    from narrows.data import dataset_labels
    from narrows.runs.files import atomic_write

    given = pick(options, EvaluateOptions, tile=tile, points=points, n_sets=n_sets,
                 eval_batch_size=eval_batch_size)
    tile, points, n_sets = given["tile"], given["points"], given["n_sets"]
    eval_batch_size = given["eval_batch_size"]
    settings = settings or MethodSettings.from_options(options, getattr(options, "seed", 0))
    metrics = list(metrics if metrics is not None else DEFAULT_METRICS)
    images, labels = image_batch(dataset, indices)
    inputs = normalizer(images.to(device))
    labels = labels.to(device)
    n, (h, w) = len(indices), images.shape[-2:]
    tiles = math.ceil(h / tile) * math.ceil(w / tile)
    forwards = {"degradation": n * 2 * points, "sensitivity-n": n * n_sets * min(16, tiles)}
    cost = sum(forwards.get(m, 0) for m in metrics) * len(methods)
    all_labels = dataset_labels(dataset)
    log(f"{name}: {len(methods)} methods × "
        f"{describe_images(indices, [all_labels[i] for i in indices], class_names)}; "
        + (f"IBA {settings.steps} steps × {settings.iba_batch} samples per image; "
           if "iba" in methods else "")
        + "metrics "
        f"{', '.join(metrics) or 'none'} ≈ {cost:,} perturbed forwards")
    rows, curves, shown = [], {}, {}
    for method in methods:
        cache = out.file(f"heatmaps_{method}.npz")
        heatmaps = _cached(cache, indices)
        if heatmaps is None:
            maps = []
            for i in progress_bar(range(n), progress, method):
                result = _attribute(method, model, inputs[i : i + 1], labels[i : i + 1],
                                    settings, statistics, ids=[indices[i]])
                maps.append(result.heatmaps[0])
            heatmaps = np.stack(maps).astype(np.float32)
            head = np.array(_header_text(HEATMAPS_KIND, method, settings.seed, model=name))
            atomic_write(cache, lambda fh, m=heatmaps, h=head: np.savez_compressed(
                fh, heatmaps=m, indices=np.array(indices), header=h))
        row, curve = _metrics(out, method, metrics, model, inputs, labels, heatmaps, dataset,
                              indices, tile, points, n_sets, eval_batch_size, settings.seed)
        rows.append(row)
        shown[method] = heatmaps[:EXAMPLES]
        if curve:
            curves[method] = curve
    subject = f"{name}, {n} images"
    write_results(out, rows, curves, tile, subject=subject)
    draw_examples(out, shown, images[:EXAMPLES], dataset, indices[:EXAMPLES],
                  class_names=class_names, subject=f"{name} · {min(EXAMPLES, n)} of {n} images")
    files = [out.file("results.csv"), out.file("results.md"), out.file("examples.png")]
    if curves:
        files.append(out.file("degradation.png"))
    if "sensitivity-n" in metrics:
        draw_sensitivity(out, methods, subject=subject)
        files.append(out.file("sensitivity_n.png"))
    files += [out.file(RESULT_FILE), out.file("results.json")]
    result = EvaluationResult(rows=rows, curves=curves, table=out.file("results.md").read_text(),
                              files=files, tile=tile)
    if out.writer:
        from narrows.runs.results import flat_summary

        result.save(out.file(RESULT_FILE))
        out.write_json("results.json", flat_summary(result, command=command))
    return result


def _origin(method: str, seed: int, model: str | None = None, **options: Any) -> dict[str, Any]:
    """The provenance of a cache of ``method``: the model, the seed and the options."""
    from narrows.runs.results import provenance

    return provenance(model=model, seed=seed, options={"method": method, **options})


def _header_text(kind: str, method: str, seed: int, model: str | None = None) -> str:
    """The result header of a heatmaps cache as JSON text (stored as an npz array)."""
    import json

    from narrows.attribution.result_files import with_header

    return json.dumps(with_header(kind, {}, _origin(method, seed, model)))


def _cached(path: Path, indices: list[int]) -> Any:
    """The heatmaps cached in ``path`` if they are of ``indices``, else None (the header, if
    the file has one, is checked)."""
    if not path.is_file():
        return None
    import json

    from narrows.attribution.result_files import without_header
    from narrows.runs.files import read_npz, reading

    data = read_npz(path, "cached heatmaps file", required=("indices", "heatmaps"))
    if "header" in data:
        with reading(path, "cached heatmaps file"):
            document = json.loads(str(data["header"]))
        without_header(document, HEATMAPS_KIND, path)
    with reading(path, "cached heatmaps file"):
        if list(data["indices"]) != indices:
            return None
        if data["heatmaps"].ndim < 3 or len(data["heatmaps"]) != len(indices):
            raise ValueError(f"heatmaps of shape {data['heatmaps'].shape} for {len(indices)} images")
        return data["heatmaps"]


def _metrics(run: RunDir, method: str, metrics: list[str], net: nn.Module, inputs: torch.Tensor,
             labels: torch.Tensor, heatmaps: Any, dataset: Any, indices: list[int], tile: int,
             points: int, n_sets: int, batch_size: int, seed: int
             ) -> tuple[dict[str, Any], dict | None]:
    """One results row for ``method`` (each metric cached in metric_<method>_<metric>.json,
    after the result header)."""
    import torch

    from narrows.attribution import bbox_ratio, degradation, sensitivity_n
    from narrows.attribution.result_files import with_header, without_header
    from narrows.data import dataset_boxes

    maps = torch.from_numpy(heatmaps)
    row: dict[str, Any] = {"method": method}
    curve = None
    for metric in metrics:
        file = f"metric_{method}_{metric}.json"
        cached = run.exists(file)
        if cached:
            values = without_header(run.read_json(file, kind=dict), METRIC_KIND,
                                    run.file(file))
        elif metric == "degradation":
            r = degradation(net, inputs, maps.to(inputs.device), labels, tile=tile,
                            n_points=points, batch_size=batch_size, seed=seed)
            morf, lerf = r.morf.mean(dim=0), r.lerf.mean(dim=0)
            values = {f"degradation_tile{tile}": r.raw_score,
                      "degradation_normalised": r.score,
                      "degradation_median": r.median_score,
                      "morf_area": float(morf.mean()), "lerf_area": float(lerf.mean()),
                      "curve": {"x": r.fractions.tolist(), "morf": morf.tolist(),
                                "lerf": lerf.tolist()}}
        elif metric == "bbox":
            r = bbox_ratio(maps, [dataset_boxes(dataset, i) for i in indices], seed=seed)
            values = {"bbox_ratio": r.mean, "bbox_images": r.n_used}
        else:
            r = sensitivity_n(net, inputs, maps.to(inputs.device), labels, tile=tile,
                              n_sets=n_sets, batch_size=batch_size, seed=seed)
            values = {"sensitivity_n": nanmean(r.pooled),
                      "sensitivity_n_per_image": nanmean(r.per_image),
                      "sensitivity": {"n": list(r.ns), "pooled": r.pooled.tolist(),
                                      "per_image": r.per_image.tolist()}}
        if not cached:
            origin = _origin(method, seed, metric=metric, tile=tile, points=points,
                             n_sets=n_sets)
            run.write_json(file, with_header(METRIC_KIND, values, origin))
        curve = values.pop("curve", curve)
        values.pop("sensitivity", None)
        row.update(values)
    return row, curve
