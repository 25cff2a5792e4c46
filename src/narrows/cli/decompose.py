"""``narrows decompose extract | validate | finetune``: class-specific filters, decomposed head."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, SubjectOptions, open_run, start
from narrows.decompose.options import ExtractOptions, FinetuneOptions, ValidateOptions

GROUPS["decompose"] = ("class-specific filters (\"Decomposing the Deep\"): per-class influential "
                       "channels, the decomposed final layer, essential features, mutual "
                       "information, CSG")


@dataclass
class ExtractConfig(ExtractOptions, SubjectOptions, CommonOptions):
    pass


@dataclass
class ValidateConfig(ValidateOptions, SubjectOptions, CommonOptions):
    pass


@dataclass
class FinetuneConfig(FinetuneOptions, SubjectOptions, CommonOptions):
    pass


# -- shared helpers ---------------------------------------------------------------------------
def _subject(cfg: Any):
    from narrows.decompose.pipeline import load_plain_subject

    return load_plain_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)


def _class_title(c: int, name: str) -> str:
    """``class 3 (cat)``, or ``class 3`` where the name is only the id."""
    return f"class {c}" if name == str(c) else f"class {c} ({name})"


# -- extract ----------------------------------------------------------------------------------
def execute_extract(cfg: ExtractConfig) -> int:
    from narrows.decompose import Extraction
    from narrows.decompose.pipeline import extract_subject
    from narrows.decompose.rules import default_k, head_shape, within_width
    from narrows.errors import UserError
    from narrows.runs import default_out

    session = start(cfg)
    subject = _subject(cfg)
    _, width = head_shape(subject.model)
    k = cfg.k or default_k(width)
    if cfg.k_img is not None and cfg.fraction is not None:
        raise UserError("--k-img and --fraction exclude each other",
                        "variant A chooses its own per-class k; drop --k-img")
    within_width((("--k", k), ("--k-img", cfg.k_img), ("--ks", max(cfg.ks or [0]))), width)
    tag = f"f{cfg.fraction:g}" if cfg.fraction else f"k{k}"
    run = open_run(cfg, "decompose extract", default_out("decompose-extract", subject.stem, tag),
                   session)
    say = session.say
    if run.exists("results.json") and run.exists("histogram.pt"):
        say(f"already extracted in {run.path}; pass --overwrite to extract again")
        return _report_extract(Extraction.load(run.path), run, say, session)
    result = extract_subject(subject, cfg, k=k, checkpoint=cfg.checkpoint, device=session.device,
                             progress=cfg.progress, run=run, say=say)
    return _report_extract(result, run, say, session)


def _report_extract(result: Any, run: Any, say: Any, session: Any) -> int:
    summary = result.diagnostics()
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
    from narrows.decompose.pipeline import is_decomposed_checkpoint, validation_report
    from narrows.decompose.rules import head_shape, within_width
    from narrows.runs import default_out

    session = start(cfg)
    say = session.say
    if cfg.checkpoint and is_decomposed_checkpoint(cfg.checkpoint):
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
    within_width((("--ks", max(cfg.ks or [0])),), head_shape(subject.model)[1])
    results = validation_report(subject, cfg, seed=cfg.seed, checkpoint=cfg.checkpoint,
                                device=session.device, progress=cfg.progress, run=run,
                                say=say).results
    return _report_validate(results, run, say, session)


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
    from narrows.decompose.pipeline import decomposed_report
    from narrows.errors import UserError
    from narrows.runs import default_out

    if cfg.indices:
        raise UserError(f"{cfg.checkpoint} is decomposed already; its indices are inside it",
                        "drop --indices")
    stem = Path(cfg.checkpoint).parent.name + "-" + Path(cfg.checkpoint).stem
    run = open_run(cfg, "decompose validate", default_out("decompose-validate", stem), session)
    report = decomposed_report(cfg.checkpoint, name=cfg.model, data=cfg.data,
                               image_size=cfg.image_size, device=session.device,
                               batch_size=cfg.batch_size, workers=cfg.workers,
                               progress=cfg.progress, say=session.say)
    report.save(run)
    session.say("a fine-tuned decomposed model: its original head no longer matches its "
                "backbone, so only the decomposed accuracy is reported")
    return _report_validate(report.results, run, session.say, session)


# -- finetune ---------------------------------------------------------------------------------
def execute_finetune(cfg: FinetuneConfig) -> int:
    from narrows.decompose import finetune, finetune_settings
    from narrows.decompose.finetune import DECOMPOSED, finetune_summary, subject_card
    from narrows.decompose.rules import load_indices
    from narrows.errors import UserError
    from narrows.runs import default_out

    if not cfg.indices:
        raise UserError("no indices given", "pass --indices FILE (from 'narrows decompose "
                        "extract', or an upstream JSON file)")
    session = start(cfg)
    subject = _subject(cfg)
    indices = load_indices(cfg.indices, subject.model)
    card = subject_card(subject, cfg.checkpoint, cfg.model)
    run = open_run(cfg, "decompose finetune",
                   default_out("decompose-finetune", subject.stem, Path(cfg.indices).stem),
                   session)
    if run.writer:
        indices.save(run.file("indices.json"))
    settings = finetune_settings(cfg, seed=cfg.seed)
    say = session.say
    train = subject.bundle.train(cfg.augment)
    say(f"fine-tuning {subject.name} decomposed with {cfg.indices} (k = {indices.k}) on "
        f"{subject.bundle.info.spec}: {cfg.epochs} epoch(s) × {len(train)} images "
        f"(forward + backward), Adam lr {cfg.lr:g}, on {session.device} → {run.path}")
    _, result = finetune(subject.model, indices, subject.bundle, settings, card=card,
                         device=session.device, run=run, progress=cfg.progress, log=say,
                         dist=session.dist)
    run.write_json("results.json", finetune_summary(result, name=subject.name, indices=cfg.indices,
                                                    k=indices.k, checkpoint=run.file(DECOMPOSED)))
    if result.final is not None:
        say(f"done: decomposed test top-1 {100 * result.final.top1:.2f}% (best "
            f"{100 * result.best_top1:.2f}%); weights with the indices in "
            f"{run.file(DECOMPOSED)}")
    session.close()
    return 0


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
