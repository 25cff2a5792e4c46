"""Whole runs on a loaded subject (model + data): the extraction and the validation report.

``subject`` is a :class:`narrows.models.subject.Subject` (``load_subject(checkpoint, model,
data)``): the model, its data bundle and its normalisation. With ``run`` (a
:class:`narrows.runs.RunDir`), a run resumes from and saves its files there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from narrows.data.streaming import Streaming
from narrows.decompose.curve import Curve, accuracy_curve
from narrows.decompose.curve import validate as validate_model
from narrows.decompose.extract import curve_ks, extract, extract_fractional
from narrows.decompose.extraction import Extraction
from narrows.decompose.indices import ClassIndices
from narrows.decompose.options import ExtractOptions, FinetuneOptions, ValidateOptions
from narrows.decompose.rules import default_k, head_shape, load_indices, nearest_k, within_width
from narrows.errors import UserError


def _close(fig: Any) -> None:
    from narrows.plotting import pyplot

    pyplot().close(fig)


# -- subjects ---------------------------------------------------------------------------------
def is_decomposed_checkpoint(path: str | Path) -> bool:
    """True when the checkpoint at ``path`` holds a decomposed head (``.index`` and ``.V``)."""
    from narrows.models import read_checkpoint

    keys = read_checkpoint(path).state_dict
    return any(k.endswith(".index") for k in keys) and any(k.endswith(".V") for k in keys)


def load_plain_subject(checkpoint: str | None, model: str | None = None,
                       data: str | None = None, image_size: int | None = None) -> Any:
    """:func:`~narrows.models.subject.load_subject`, refusing a decomposed checkpoint (indices
    are made for, and applied to, the plain model)."""
    if checkpoint and is_decomposed_checkpoint(checkpoint):
        raise UserError(f"{checkpoint} is a decomposed checkpoint",
                        "pass the plain model's checkpoint (the one the indices were made for)")
    from narrows.models.subject import load_subject

    return load_subject(checkpoint, model, data, image_size)


# -- extraction -------------------------------------------------------------------------------
def extraction_k(model: Any, options: ExtractOptions,
                 name: Callable[[str], str] = str) -> int:
    """The k of extracting from ``model`` with ``options`` (default: :func:`default_k` of the
    head's width), after refusing ``k_img`` with ``fraction`` and any k wider than the head;
    ``name`` is how the caller calls a parameter (e.g. as a command-line flag)."""
    width = head_shape(model)[1]
    k = options.k or default_k(width)
    if options.k_img is not None and options.fraction is not None:
        raise UserError(f"{name('k_img')} and {name('fraction')} exclude each other",
                        f"variant A chooses its own per-class k; drop {name('k_img')}")
    within_width(((name("k"), k), (name("k_img"), options.k_img),
                  (name("ks"), max(options.ks or [0]))), width)
    return k


def extract_subject(subject: Any, options: ExtractOptions | None = None, *,
                    checkpoint: str | None = None, device: Any = "cpu", progress: bool = False,
                    run: Any = None, say: Callable[[str], None] = print,
                    **overrides: Any) -> Extraction:
    """The :class:`Extraction` of ``subject`` on its plain (unaugmented) ``split``: k most
    frequent channels per class (``k`` default: :func:`default_k` of the width), or variant A
    with ``fraction``; ``ks`` (default :func:`curve_ks`) are counted in the same pass. With
    ``run``, resumes from its ``partial.pt`` and saves every file of ``narrows decompose
    extract`` there. ``checkpoint`` (the subject's file) is recorded in the metadata.

    The options are ``options`` (default: those of ``narrows decompose extract``) with
    ``overrides`` by field name of :class:`ExtractOptions` (``k=``, ``k_img=``, ``fraction=``,
    ``ks=``, ``thresholds=``, ``layer=``, ``split=``, ``batch_size=``, ``workers=``,
    ``save_every=``)."""
    opts = replace(ExtractOptions() if options is None else options, **overrides)
    k, k_img, fraction, ks, thresholds = opts.k, opts.k_img, opts.fraction, opts.ks, opts.thresholds
    layer, split, batch_size, workers = opts.layer, opts.split, opts.batch_size, opts.workers
    save_every = opts.save_every
    classes, width = head_shape(subject.model)
    k = extraction_k(subject.model, opts)
    dataset = subject.bundle.split(split, "none")
    meta = {"model": subject.name, "checkpoint": checkpoint,
            "data": subject.bundle.info.spec, "split": split,
            "class_names": list(subject.bundle.info.class_names)}
    say(f"extracting from {subject.name} on {len(dataset)} {split} images of "
        f"{subject.bundle.info.spec} ({classes} classes, {width} channels) on {device}"
        + (f" → {run.path}" if run is not None else ""))
    from narrows.training import Normalizer

    common = {"num_classes": classes, "thresholds": list(thresholds), "layer": layer,
              "normalizer": Normalizer(subject.mean, subject.std), "device": device,
              "batch_size": batch_size, "workers": workers, "progress": progress,
              "resume": run.file("partial.pt") if run is not None else None,
              "save_every": save_every, "say": say, "meta": meta}
    if fraction is not None:
        result = extract_fractional(subject.model, dataset, fraction, **common)
    else:
        ks = list(ks) if ks is not None else curve_ks(width)
        result = extract(subject.model, dataset, k=k, k_img=k_img, ks=ks, **common)
    if run is not None and run.writer:
        save_extraction(result, run)
    return result


def save_extraction(result: Extraction, run: Any) -> None:
    """Every file of ``narrows decompose extract`` for the extraction ``result`` into ``run``
    (a RunDir): the extraction, ``indices_upstream.json``, ``histogram.png`` and
    ``results.json``."""
    result.save(run.path)
    result.chosen().save_upstream(run.file("indices_upstream.json"))
    fig, _ = result.plot()
    run.save_figure("histogram.png", fig)
    _close(fig)
    run.write_json("results.json", {"summary": result.summary(), **result.diagnostics()})


# -- validation -------------------------------------------------------------------------------
@dataclass
class ValidationReport:
    """Full and decomposed accuracy of one model, and the accuracy-vs-k curve.

    ``results`` is the ``results.json`` document (``model``, ``data``, ``n``, ``full``, and
    ``decomposed``, ``curve``, ``curve_table`` when computed); ``curve`` the :class:`Curve`.
    """

    results: dict[str, Any]
    curve: Curve | None = None
    title: str = ""

    def save(self, run: Any) -> None:
        """``results.json`` (after the header) and, with a curve, ``curve.csv``/``curve.json``
        and ``accuracy_vs_k.png`` into ``run`` (a RunDir, or a directory path)."""
        from narrows.decompose.saving import as_run, decompose_header

        run = as_run(run)
        if self.curve is not None and run.writer:
            self.curve.save(run.path)
            fig, _ = self.curve.plot(title=self.title)
            run.save_figure("accuracy_vs_k.png", fig)
            _close(fig)
        seed = self.curve.meta.get("seed") if self.curve is not None else None
        run.write_json("results.json", {**decompose_header("validation", self.results, seed),
                                        "summary": self.summary(), **self.results})

    @classmethod
    def load(cls, path: str | Path) -> ValidationReport:
        """Read what :meth:`save` wrote (``path``: the directory or its ``results.json``)."""
        from narrows.decompose.saving import strip_header
        from narrows.runs.files import read_json_file, reading
        from narrows.runs.results import check_header

        path = Path(path)
        file = path / "results.json" if path.is_dir() else path
        fix = "run 'narrows decompose validate' again"
        document = read_json_file(file, "validation results file", fix, required_keys=("n",))
        check_header(document, "decompose.validation", 1, str(file))
        results = strip_header(document)
        results.pop("summary", None)  # made from the rest
        with reading(file, "validation results file", fix):
            curve = Curve.from_json(results["curve"]) if "curve" in results else None
        return cls(results, curve)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row for the full model, one for the decomposed one (when scored), one per point
        of the curve: ``source``, ``k``, ``top1``, ``top5``, ``loss``, ``n``."""
        rows = []
        for source in ("full", "decomposed"):
            scores = self.results.get(source)
            if isinstance(scores, dict):
                rows.append({"source": source, "k": scores.get("k"),
                             **{key: scores.get(key) for key in ("top1", "top5", "loss")},
                             "n": self.results.get("n")})
        if self.curve is not None:
            rows += [{**row, "top5": None, "loss": None, "n": self.curve.n}
                     for row in self.curve.rows()]
        return rows

    def summary(self) -> str:
        """One line: full and decomposed top-1, and the curve's size."""
        parts = []
        for source in ("full", "decomposed"):
            scores = self.results.get(source)
            if isinstance(scores, dict) and "top1" in scores:
                k = f" (k = {scores['k']})" if scores.get("k") is not None else ""
                parts.append(f"{source}{k} top-1 {100 * float(scores['top1']):.2f}%")
        line = "; ".join(parts) + f" on {self.results.get('n')} test images"
        if self.curve is not None:
            line += f"; curve: {len(self.curve.top1)} sources × {len(self.curve.ks)} k"
        return line

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """The accuracy-vs-k curve when there is one, else a bar of each top-1; returns
        ``(fig, ax)``."""
        if self.curve is not None:
            return self.curve.plot(ax=ax, title=self.title or None)
        from narrows.plotting import pyplot

        if ax is None:
            fig, ax = pyplot().subplots(figsize=(4, 3.2))
        else:
            fig = ax.figure
        names = [s for s in ("full", "decomposed") if isinstance(self.results.get(s), dict)]
        ax.bar(names, [100 * float(self.results[s]["top1"]) for s in names])
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(self.title or "accuracy", fontsize=10)
        fig.tight_layout()
        return fig, ax


def _sources(classes: int, width: int, linear: Any, extraction: Extraction | None,
             baselines: Sequence[str], seed: int) -> dict[str, Callable[[int], ClassIndices]]:
    sources: dict[str, Any] = {}
    if extraction is not None:
        sources["histogram"] = lambda k: extraction.indices(k, nearest_k(extraction.ks, k))
    if "random" in baselines:
        sources["random"] = lambda k: ClassIndices.random(classes, width, k, seed)
    if "top-weights" in baselines:
        sources["top-weights"] = lambda k: ClassIndices.top_weights(linear, k)
    return sources


def _load_extraction(path: str | None, classes: int, width: int) -> Extraction | None:
    extraction = Extraction.load(path) if path else None
    if extraction is not None and (extraction.num_classes, extraction.num_channels) != (
        classes, width
    ):
        raise UserError(
            f"{path} was extracted for {extraction.num_classes} classes and "
            f"{extraction.num_channels} channels, but the model has {classes} and {width}",
            "extract for this model",
        )
    return extraction


def validation_report(subject: Any, options: ValidateOptions | None = None, *, seed: int = 0,
                      checkpoint: str | None = None, device: Any = "cpu",
                      progress: bool = False, run: Any = None,
                      say: Callable[[str], None] = print, name: Callable[[str], str] = str,
                      **overrides: Any) -> ValidationReport:
    """Accuracy of ``subject``'s model on its test split: full, decomposed with the indices
    file ``indices``, and (``curve``) vs k for the histograms of the ``extraction`` directory
    and the ``baselines`` (``ks`` default :func:`curve_ks`). With ``run``, saved there;
    ``name`` is how the caller calls a parameter in messages (e.g. as a command-line flag);
    ``checkpoint`` (the subject's file) is recorded in the results.

    The options are ``options`` (default: those of ``narrows decompose validate``) with
    ``overrides`` by field name of :class:`ValidateOptions` (``indices=``, ``extraction=``,
    ``ks=``, ``baselines=``, ``curve=``, ``batch_size=``, ``workers=``)."""
    opts = replace(ValidateOptions() if options is None else options, **overrides)
    indices, extraction, ks, baselines = opts.indices, opts.extraction, opts.ks, opts.baselines
    curve, batch_size, workers = opts.curve, opts.batch_size, opts.workers
    from narrows.decompose.parts import split_head
    from narrows.training import Normalizer

    model, bundle = subject.model, subject.bundle
    _, linear = split_head(model)
    classes, width = linear.out_features, linear.in_features
    within_width(((name("ks"), max(ks or [0])),), width)
    chosen = load_indices(indices, model) if indices else None
    histograms = _load_extraction(extraction, classes, width)
    test = bundle.test()
    common = {"normalizer": Normalizer(subject.mean, subject.std),
              "how": Streaming(device, batch_size, workers, progress)}
    say(f"validating {subject.name} on {len(test)} test images of {bundle.info.spec} "
        f"on {device}" + (f" → {run.path}" if run is not None else ""))
    full = validate_model(model, test, **common)
    results: dict[str, Any] = {"model": subject.name, "checkpoint": checkpoint,
                               "data": bundle.info.spec, "n": full.n, "full": full.to_dict()}
    if chosen is not None:
        dec = validate_model(model, test, chosen, **common)
        results["decomposed"] = {**dec.to_dict(), "indices": indices, "k": chosen.k,
                                 "union_size": len(chosen.union())}
    report = ValidationReport(results, title=f"{subject.name}: decomposed accuracy vs k")
    sources = _sources(classes, width, linear, histograms, baselines, seed) if curve else {}
    if sources:
        ks = list(ks) if ks is not None else curve_ks(width)
        heads = len(sources) * len([k for k in ks if 1 <= k <= width])
        say(f"accuracy vs k: {heads} decomposed heads scored on each test batch's features "
            f"(one forward pass per image)")
        report.curve = accuracy_curve(model, test, sources, ks, **common)
        report.curve.meta = {"model": subject.name, "data": bundle.info.spec, "seed": seed,
                             "extraction": extraction}
        results["curve"] = report.curve.to_json()
        results["curve_table"] = report.curve.table()
    if run is not None:
        report.save(run)
    return report


def decomposed_report(checkpoint: str | Path, *, name: str | None = None,
                      data: str | None = None, image_size: int | None = None,
                      device: Any = "cpu", batch_size: int = 256, workers: int = 0,
                      progress: bool = False,
                      say: Callable[[str], None] = print) -> ValidationReport:
    """Accuracy of a decomposed checkpoint (from ``finetune``) as it is, on ``data`` (a spec;
    default: the one its card records); its original head is stale, so only this is scored."""
    from narrows.decompose.head import load_decomposed
    from narrows.models.inputs import data_for_model
    from narrows.training import Normalizer

    loaded = load_decomposed(checkpoint, name=name)
    card = loaded.card
    spec = data or (card.data_spec if card else None)
    if not spec:
        raise UserError("no data given", "pass data (a data spec; on the command line --data "
                        "SPEC)")
    served = data_for_model(spec, card, loaded.model, image_size=image_size, say=say,
                            what=str(checkpoint))
    result = validate_model(loaded.model, served.bundle.test(),
                            normalizer=Normalizer(served.mean, served.std),
                            how=Streaming(device, batch_size, workers, progress))
    return ValidationReport({"checkpoint": checkpoint, "data": spec, "n": result.n,
                             "decomposed": {**result.to_dict(), "indices": "inside the checkpoint",
                                            "k": loaded.indices.k}})


# -- fine-tuning ------------------------------------------------------------------------------
def finetune_subject(subject: Any, indices: ClassIndices, options: FinetuneOptions, run: Any, *,
                     source: str, checkpoint: str | None = None, architecture: str | None = None,
                     seed: int = 0, device: Any = "cpu", progress: bool = False,
                     say: Callable[[str], None] = print, dist: Any = None) -> Any:
    """Fine-tune ``subject``'s model decomposed with ``indices`` (read from the file ``source``)
    as :func:`~narrows.decompose.finetune` does, into ``run`` (a RunDir): ``indices.json``, the
    checkpoints, ``decomposed.pt`` and ``results.json``; returns the ``TrainResult``."""
    from narrows.decompose.finetune import (
        DECOMPOSED,
        finetune,
        finetune_settings,
        finetune_summary,
        subject_card,
    )

    card = subject_card(subject, checkpoint, architecture)
    if run.writer:
        indices.save(run.file("indices.json"))
    settings = finetune_settings(options, seed=seed)
    train = subject.bundle.train(options.augment)
    say(f"fine-tuning {subject.name} decomposed with {source} (k = {indices.k}) on "
        f"{subject.bundle.info.spec}: {options.epochs} epoch(s) × {len(train)} images "
        f"(forward + backward), Adam lr {options.lr:g}, on {device} → {run.path}")
    _, result = finetune(subject.model, indices, subject.bundle, settings, card=card,
                         device=device, run=run, progress=progress, log=say, dist=dist)
    run.write_json("results.json", finetune_summary(result, name=subject.name, indices=source,
                                                    k=indices.k, checkpoint=run.file(DECOMPOSED)))
    return result
