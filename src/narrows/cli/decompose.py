"""``narrows decompose extract | validate | finetune``: class-specific filters, decomposed head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, SubjectOptions, open_run, start
from narrows.config import Range, at_least, distinct, non_negative, not_empty, option, positive

GROUPS["decompose"] = ("class-specific filters (\"Decomposing the Deep\"): per-class influential "
                       "channels, the decomposed final layer, essential features, mutual "
                       "information, CSG")
BASELINES = ("random", "top-weights")
WIDE = 1024  # feature widths from here on (ImageNet ResNet-50: 2048) default to k = 50


def default_k(width: int) -> int:
    """5 for CIFAR-size heads (D < 1024), 50 for wider ones (ImageNet ResNet-50), as upstream."""
    return 50 if width >= WIDE else 5


@dataclass
class ExtractConfig(SubjectOptions, CommonOptions):
    k: int | None = option(None, "influential channels per class [default: 5, or 50 when the "
                           "head reads ≥ 1024 channels]", short="-k", check=positive)
    k_img: int | None = option(None, "channels counted per image (its top k_img positive "
                               "responses) [default: k]", check=positive)
    fraction: float | None = option(None, "variant A instead of k: a fraction in (0, 1); each "
                                    "class gets its own number of channels (two passes)",
                                    check=Range(0, 1, low_open=True, high_open=True))
    layer: str | None = option(None, "module whose output is pooled (e.g. layer3.2) [default: "
                               "the pooled input of the final linear layer]")
    split: Literal["train", "test"] = option("train", "split the histograms are counted on "
                                             "(no augmentation)")
    ks: list[int] | None = option(None, "further per-image k counted in the same pass, for "
                                  "'validate --extraction' curves [default: 1 2 3 4 5 8 10 16 "
                                  "20 ... up to D]", check=at_least(1).also(not_empty, distinct))
    thresholds: list[float] = option([0.5, 0.75, 0.9], "mass fractions t of the selectivity Ψ",
                                     check=Range(0, 1, low_open=True).also(not_empty))
    batch_size: int = option(256, "images per forward pass", check=positive,
                             affects_result=False)
    workers: int = option(0, "data-loading worker processes", check=non_negative,
                          affects_result=False)
    save_every: int = option(200, "save the counts every N batches (a killed run resumes "
                             "there)", check=positive, affects_result=False)


@dataclass
class ValidateConfig(SubjectOptions, CommonOptions):
    indices: str | None = option(None, "indices JSON (upstream or narrows form): report the "
                                 "accuracy decomposed with them", metavar="FILE")
    extraction: str | None = option(None, "an 'extract' --out directory: its histograms give "
                                    "the 'histogram' curve", metavar="DIR")
    ks: list[int] | None = option(None, "k of the accuracy-vs-k curve [default: 1 2 3 4 5 8 "
                                  "10 16 20 ... up to D]",
                                  check=at_least(1).also(not_empty, distinct))
    baselines: list[Literal["random", "top-weights"]] = option(
        list(BASELINES), "baseline indices on the curve: random channels (from --seed) and "
                         "each class's top-|W| weights")
    curve: bool = option(True, "compute the accuracy-vs-k curve")
    batch_size: int = option(256, "images per forward pass", check=positive,
                             affects_result=False)
    workers: int = option(0, "data-loading worker processes", check=non_negative,
                          affects_result=False)


@dataclass
class FinetuneConfig(SubjectOptions, CommonOptions):
    indices: str | None = option(None, "indices JSON (upstream or narrows form) to decompose "
                                 "with (required)", metavar="FILE")
    epochs: int = option(1, "fine-tuning epochs (upstream CIFAR: 1-3)", check=positive)
    lr: float = option(1e-4, "Adam learning rate, constant (upstream CIFAR 1e-4, ImageNet 1e-6)",
                       check=positive)
    batch_size: int = option(128, "images per step", check=positive)
    augment: Literal["auto", "none", "crop", "flip", "crop-flip", "resized-crop-flip"] = option(
        "auto", "augmentation; auto = the data set's standard one")
    workers: int = option(0, "data-loading worker processes", check=non_negative,
                          affects_result=False)
    eval_batch_size: int = option(256, "images per evaluation batch", check=positive,
                                  affects_result=False)


# -- shared helpers ---------------------------------------------------------------------------
def _subject(cfg: Any):
    from narrows.errors import UserError

    if cfg.checkpoint and _is_decomposed_file(cfg.checkpoint):
        raise UserError(f"{cfg.checkpoint} is a decomposed checkpoint",
                        "pass the plain model's checkpoint (the one the indices were made for)")
    from narrows.models.subject import load_subject

    return load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)


def _is_decomposed_file(path: str) -> bool:
    from narrows.models import read_checkpoint

    keys = read_checkpoint(path).state_dict
    return any(k.endswith(".index") for k in keys) and any(k.endswith(".V") for k in keys)


def _load_indices(path: str, model: Any):
    """The indices of ``path``, checked against the model's classes and channels."""
    from narrows.decompose import ClassIndices, split_head

    _, linear = split_head(model)
    return ClassIndices.load(path, num_classes=linear.out_features,
                             num_channels=linear.in_features)


def _class_title(c: int, name: str) -> str:
    """``class 3 (cat)``, or ``class 3`` where the name is only the id."""
    return f"class {c}" if name == str(c) else f"class {c} ({name})"


def _close(fig: Any) -> None:
    from narrows.plotting import pyplot

    pyplot().close(fig)


# -- extract ----------------------------------------------------------------------------------
def execute_extract(cfg: ExtractConfig) -> int:
    from narrows.decompose import Extraction, curve_ks, extract, extract_fractional, split_head
    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.training import Normalizer

    session = start(cfg)
    subject = _subject(cfg)
    _, linear = split_head(subject.model)
    width, classes = linear.in_features, linear.out_features
    k = cfg.k or default_k(width)
    if cfg.k_img is not None and cfg.fraction is not None:
        raise UserError("--k-img and --fraction exclude each other",
                        "variant A chooses its own per-class k; drop --k-img")
    _within_width((("--k", k), ("--k-img", cfg.k_img), ("--ks", max(cfg.ks or [0]))), width)
    tag = f"f{cfg.fraction:g}" if cfg.fraction else f"k{k}"
    run = open_run(cfg, "decompose extract", default_out("decompose-extract", subject.stem, tag),
                   session)
    say = session.say
    if run.exists("results.json") and run.exists("histogram.pt"):
        say(f"already extracted in {run.path}; pass --overwrite to extract again")
        return _report_extract(Extraction.load(run.path), run, say, session)
    dataset = subject.bundle.split(cfg.split, "none")
    meta = {"model": subject.name, "checkpoint": cfg.checkpoint,
            "data": subject.bundle.info.spec, "split": cfg.split,
            "class_names": list(subject.bundle.info.class_names)}
    say(f"extracting from {subject.name} on {len(dataset)} {cfg.split} images of "
        f"{subject.bundle.info.spec} ({classes} classes, {width} channels) on {session.device}"
        f" → {run.path}")
    common = {"num_classes": classes, "thresholds": cfg.thresholds, "layer": cfg.layer,
              "normalizer": Normalizer(subject.mean, subject.std), "device": session.device,
              "batch_size": cfg.batch_size, "workers": cfg.workers, "progress": cfg.progress,
              "resume": run.file("partial.pt"), "save_every": cfg.save_every, "say": say,
              "meta": meta}
    if cfg.fraction is not None:
        result = extract_fractional(subject.model, dataset, cfg.fraction, **common)
    else:
        ks = cfg.ks if cfg.ks is not None else curve_ks(width)
        result = extract(subject.model, dataset, k=k, k_img=cfg.k_img, ks=ks, **common)
    if run.writer:
        result.save(run.path)
        result.chosen().save_upstream(run.file("indices_upstream.json"))
        fig, _ = result.plot()
        run.save_figure("histogram.png", fig)
        _close(fig)
        run.write_json("results.json", result.summary())
    return _report_extract(result, run, say, session)


def _report_extract(result: Any, run: Any, say: Any, session: Any) -> int:
    summary = result.summary()
    chosen = result.chosen()
    say(f"k = {chosen.k or 'per class ' + str([len(r) for r in chosen.indices])} "
        f"(per image: {result.k_img}); union of the classes' channels: {summary['union_size']} "
        f"of {result.num_channels}; mean top-{result.k_mass} mass "
        f"{summary['mean_mass_overall']:.3f}")
    for t, psi in summary.get("psi", {}).items():
        say(f"selectivity Ψ({t}) = {psi['overall_median']:.3f} (median-based), "
            f"{psi['overall_mean']:.3f} (mean-based)")
    from narrows.decompose.extraction import class_labels

    names = class_labels(result.meta.get("class_names"), len(chosen.indices))
    for c, row in enumerate(chosen.indices[:10]):
        say(f"  {_class_title(c, names[c])}: {row}")
    if len(chosen.indices) > 10:
        say(f"  ... {len(chosen.indices) - 10} more classes")
    say(f"→ {run.file('indices.json')} (and indices_upstream.json, ranking.json, histogram.pt, "
        f"histogram.png, results.json)")
    session.close()
    return 0


# -- validate ---------------------------------------------------------------------------------
def execute_validate(cfg: ValidateConfig) -> int:
    from narrows.runs import default_out

    session = start(cfg)
    say = session.say
    if cfg.checkpoint and _is_decomposed_file(cfg.checkpoint):
        return _validate_decomposed(cfg, session)
    subject = _subject(cfg)
    tag = Path(cfg.indices).stem if cfg.indices else "full"
    run = open_run(cfg, "decompose validate",
                   default_out("decompose-validate", subject.stem, tag), session)
    if run.exists("results.json"):
        say(f"already validated in {run.path}; pass --overwrite to validate again")
        from narrows.runs.files import reading

        with reading(run.file("results.json"), "cached validate result"):
            return _report_validate(run.read_json("results.json", kind=dict), run, say, session)
    results = validate_into(cfg, subject, run, session)
    return _report_validate(results, run, say, session)


def _within_width(values: Any, width: int) -> None:
    """Refuse any ``(flag, k)`` whose k exceeds the ``width`` channels the head reads."""
    from narrows.errors import UserError

    for name, value in values:
        if value is not None and value > width:
            raise UserError(f"{name} {value} exceeds the {width} channels the head reads",
                            f"pass {name} of at most {width}")


def validate_into(cfg: ValidateConfig, subject: Any, run: Any, session: Any) -> dict[str, Any]:
    """Full and decomposed accuracy and the curve of ``subject`` into ``run``; the results."""
    from narrows.decompose import ClassIndices, Extraction, accuracy_curve, curve_ks, split_head
    from narrows.decompose import validate as validate_model
    from narrows.errors import UserError
    from narrows.training import Normalizer

    model, bundle = subject.model, subject.bundle
    _, linear = split_head(model)
    classes, width = linear.out_features, linear.in_features
    _within_width((("--ks", max(cfg.ks or [0])),), width)
    indices = _load_indices(cfg.indices, model) if cfg.indices else None
    extraction = Extraction.load(cfg.extraction) if cfg.extraction else None
    if extraction is not None and (extraction.num_classes, extraction.num_channels) != (
        classes, width
    ):
        raise UserError(
            f"{cfg.extraction} was extracted for {extraction.num_classes} classes and "
            f"{extraction.num_channels} channels, but the model has {classes} and {width}",
            "extract for this model",
        )
    normalizer = Normalizer(subject.mean, subject.std)
    test = bundle.test()
    common = {"normalizer": normalizer, "device": session.device, "batch_size": cfg.batch_size,
              "workers": cfg.workers, "progress": cfg.progress}
    say = session.say
    say(f"validating {subject.name} on {len(test)} test images of {bundle.info.spec} "
        f"on {session.device} → {run.path}")
    full = validate_model(model, test, **common)
    results: dict[str, Any] = {"model": subject.name, "checkpoint": cfg.checkpoint,
                               "data": bundle.info.spec, "n": full.n, "full": full.to_dict()}
    if indices is not None:
        dec = validate_model(model, test, indices, **common)
        results["decomposed"] = {**dec.to_dict(), "indices": cfg.indices, "k": indices.k,
                                 "union_size": len(indices.union())}
    if cfg.curve:
        sources: dict[str, Any] = {}
        if extraction is not None:
            sources["histogram"] = lambda k: extraction.indices(k, _nearest(extraction.ks, k))
        if "random" in cfg.baselines:
            sources["random"] = lambda k: ClassIndices.random(classes, width, k, cfg.seed)
        if "top-weights" in cfg.baselines:
            sources["top-weights"] = lambda k: ClassIndices.top_weights(linear, k)
        if sources:
            ks = cfg.ks if cfg.ks is not None else curve_ks(width)
            heads = len(sources) * len([k for k in ks if 1 <= k <= width])
            say(f"accuracy vs k: {heads} decomposed heads scored on each test batch's features "
                f"(one forward pass per image)")
            curve = accuracy_curve(model, test, sources, ks, **common)
            curve.meta = {"model": subject.name, "data": bundle.info.spec, "seed": cfg.seed,
                          "extraction": cfg.extraction}
            if run.writer:
                curve.save(run.path)
                fig, _ = curve.plot(title=f"{subject.name}: decomposed accuracy vs k")
                run.save_figure("accuracy_vs_k.png", fig)
                _close(fig)
            results["curve"] = curve.to_json()
            results["curve_table"] = curve.table()
    run.write_json("results.json", results)
    return results


def _nearest(ks: list[int], k: int) -> int:
    """The per-image k counted in the extraction to read the histogram of k from: k itself when
    it was counted, else the largest counted one below it (or the smallest)."""
    if k in ks:
        return k
    below = [x for x in ks if x < k]
    return max(below) if below else min(ks)


def _report_validate(results: dict[str, Any], run: Any, say: Any, session: Any) -> int:
    if "full" in results:
        say(f"full model: top-1 {100 * results['full']['top1']:.2f}% on {results['n']} images")
    if "decomposed" in results:
        dec = results["decomposed"]
        say(f"decomposed ({dec.get('indices')}, k = {dec.get('k')}): top-1 "
            f"{100 * dec['top1']:.2f}%")
    if "curve_table" in results:
        say(results["curve_table"])
        say(f"→ {run.file('accuracy_vs_k.png')}, curve.csv, results.json")
    else:
        say(f"→ {run.file('results.json')}")
    session.close()
    return 0


def _validate_decomposed(cfg: ValidateConfig, session: Any) -> int:
    """A fine-tuned decomposed checkpoint: its own accuracy only (its W is stale)."""
    from narrows.decompose import load_decomposed
    from narrows.decompose import validate as validate_model
    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.training import Normalizer

    if cfg.indices:
        raise UserError(f"{cfg.checkpoint} is decomposed already; its indices are inside it",
                        "drop --indices")
    loaded = load_decomposed(cfg.checkpoint, name=cfg.model)
    card = loaded.card
    spec = cfg.data or (card.data_spec if card else None)
    if not spec:
        raise UserError("no data given", "pass --data SPEC")
    from narrows.models.inputs import data_for_model

    served = data_for_model(spec, card, loaded.model, image_size=cfg.image_size,
                            say=session.say, what=str(cfg.checkpoint))
    bundle, mean, std = served.bundle, served.mean, served.std
    stem = Path(cfg.checkpoint).parent.name + "-" + Path(cfg.checkpoint).stem
    run = open_run(cfg, "decompose validate", default_out("decompose-validate", stem), session)
    result = validate_model(loaded.model, bundle.test(), normalizer=Normalizer(mean, std),
                            device=session.device, batch_size=cfg.batch_size,
                            workers=cfg.workers, progress=cfg.progress)
    results = {"checkpoint": cfg.checkpoint, "data": spec, "n": result.n,
               "decomposed": {**result.to_dict(), "indices": "inside the checkpoint",
                              "k": loaded.indices.k}}
    run.write_json("results.json", results)
    session.say("a fine-tuned decomposed model: its original head no longer matches its "
                "backbone, so only the decomposed accuracy is reported")
    return _report_validate(results, run, session.say, session)


# -- finetune ---------------------------------------------------------------------------------
def execute_finetune(cfg: FinetuneConfig) -> int:
    from narrows.decompose import finetune, finetune_settings
    from narrows.decompose.finetune import DECOMPOSED
    from narrows.errors import UserError
    from narrows.runs import default_out

    if not cfg.indices:
        raise UserError("no indices given", "pass --indices FILE (from 'narrows decompose "
                        "extract', or an upstream JSON file)")
    session = start(cfg)
    subject = _subject(cfg)
    indices = _load_indices(cfg.indices, subject.model)
    card = _card(cfg, subject)
    run = open_run(cfg, "decompose finetune",
                   default_out("decompose-finetune", subject.stem, Path(cfg.indices).stem),
                   session)
    if run.writer:
        indices.save(run.file("indices.json"))
    settings = finetune_settings(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                 augment=cfg.augment, workers=cfg.workers,
                                 eval_batch_size=cfg.eval_batch_size, seed=cfg.seed)
    say = session.say
    train = subject.bundle.train(cfg.augment)
    say(f"fine-tuning {subject.name} decomposed with {cfg.indices} (k = {indices.k}) on "
        f"{subject.bundle.info.spec}: {cfg.epochs} epoch(s) × {len(train)} images "
        f"(forward + backward), Adam lr {cfg.lr:g}, on {session.device} → {run.path}")
    _, result = finetune(subject.model, indices, subject.bundle, settings, card=card,
                         device=session.device, run=run, progress=cfg.progress, log=say,
                         dist=session.dist)
    summary = {"model": subject.name, "indices": cfg.indices, "k": indices.k,
               "epochs": result.epochs, "best_top1": result.best_top1,
               "final": result.final.to_dict() if result.final else None,
               "per_epoch_test_top1": [r["test_top1"] for r in result.metrics],
               "checkpoint": str(run.file(DECOMPOSED))}
    run.write_json("results.json", summary)
    if result.final is not None:
        say(f"done: decomposed test top-1 {100 * result.final.top1:.2f}% (best "
            f"{100 * result.best_top1:.2f}%); weights with the indices in "
            f"{run.file(DECOMPOSED)}")
    session.close()
    return 0


def _card(cfg: FinetuneConfig, subject: Any) -> Any:
    from narrows.models import ModelCard, read_checkpoint

    info = subject.bundle.info
    saved = read_checkpoint(cfg.checkpoint).card if cfg.checkpoint else None
    if saved is not None:
        return ModelCard(**{**saved.to_dict(), "data_spec": info.spec})
    return ModelCard(architecture=cfg.model or "model", num_classes=info.num_classes,
                     in_chans=info.in_chans, input_size=info.image_size,
                     mean=tuple(subject.mean), std=tuple(subject.std),
                     class_names=tuple(info.class_names), data_spec=info.spec)


# -- quickstart -------------------------------------------------------------------------------
def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """Extraction and decomposed accuracy vs k on the quickstart's digits ResNet-20
    (``out/train/best.pt``), into ``out/decompose``."""

    checkpoint = str(out / "train" / "best.pt")
    target = out / "decompose"
    execute_extract(ExtractConfig(checkpoint=checkpoint, k=5, **cfg.inherited(target / "extract")))
    execute_validate(ValidateConfig(checkpoint=checkpoint,
                                    indices=str(target / "extract" / "indices.json"),
                                    extraction=str(target / "extract"),
                                    **cfg.inherited(target / "validate")))
    from narrows.runs.files import read_json_file

    results = read_json_file(target / "validate" / "results.json", "validate results file",
                             kind=dict)
    curve = results["curve"]
    at5 = {s: v[curve["ks"].index(5)] for s, v in curve["top1"].items()}
    return (f"decomposed head, k = 5: {100 * results['decomposed']['top1']:.1f}% with histogram "
            f"indices vs {100 * at5['random']:.1f}% random, {100 * at5['top-weights']:.1f}% "
            f"top-|W| (full {100 * results['full']['top1']:.1f}%): "
            f"{target / 'validate' / 'accuracy_vs_k.png'}")


register(Command(
    words=("decompose", "extract"),
    summary="find each class's influential channels (frequency histograms of top channels)",
    description="For each class, count how often each channel of the pooled last feature layer "
    "(the input of the model's last nn.Linear) is among an image's top k_img positive responses "
    "(channels ranked by their positive spatial means, not an L1 norm), over the images of that "
    "class (one streamed forward pass, nothing of size images×channels kept), and keep the k most frequent "
    "channels (ties: lower id first). Writes indices.json (narrows form with provenance), "
    "indices_upstream.json (the upstream {\"0\": [...]} form), ranking.json, histogram.pt, "
    "histogram.png (heat map) and results.json (top-k mass, selectivity Ψ). A killed run resumes "
    "from its last saved batch.",
    config=ExtractConfig,
    target="narrows.cli.decompose:execute_extract",
    epilog="examples:\n  narrows decompose extract --checkpoint runs/train/resnet20_cifar-digits/"
    "best.pt --k 5\n  narrows decompose extract --checkpoint resnet20-12fca82f.th --model "
    "resnet20_cifar --data cifar10:data --k 5 --layer layer3.2\n  narrows decompose extract "
    "--checkpoint best.pt --fraction 0.5   # variant A",
))
register(Command(
    words=("decompose", "validate"),
    summary="accuracy of the decomposed final layer, at given indices and as a function of k",
    description="Evaluate the full model and, with --indices, the model whose final layer "
    "reads only each class's channels (V gathered from W, bias copied). The accuracy-vs-k "
    "curve compares histogram indices (--extraction), random channels and each class's "
    "top-|W| weights; at k = D every curve equals the full model exactly. Writes results.json, "
    "curve.csv, curve.json and accuracy_vs_k.png. A decomposed checkpoint from 'finetune' is "
    "evaluated as it is.",
    config=ValidateConfig,
    target="narrows.cli.decompose:execute_validate",
    epilog="examples:\n  narrows decompose validate --checkpoint best.pt --indices "
    "runs/decompose-extract/X/indices.json --extraction runs/decompose-extract/X\n"
    "  narrows decompose validate --checkpoint resnet20-12fca82f.th --model resnet20_cifar "
    "--data cifar10:data --indices resnet20_cifar-10_indices.json",
))
register(Command(
    words=("decompose", "finetune"),
    summary="fine-tune the decomposed network (indices fixed; checkpoint records them)",
    description="Decompose the model's final layer with --indices and fine-tune the whole "
    "network on the decomposed logits (upstream: Adam, constant lr, every parameter but the "
    "original W and b). Checkpoints every epoch (resumable) and writes decomposed.pt: the best "
    "weights with the card and the indices, which 'decompose validate --checkpoint' reads.",
    config=FinetuneConfig,
    target="narrows.cli.decompose:execute_finetune",
    epilog="example:\n  narrows decompose finetune --checkpoint best.pt --indices indices.json "
    "--epochs 2 --lr 1e-4",
))
