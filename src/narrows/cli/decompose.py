"""``narrows decompose extract | validate | finetune``: class-specific filters, decomposed head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from narrows.cli.app import GROUPS, command
from narrows.config import compose
from narrows.decompose.options import ExtractOptions, FinetuneOptions, ValidateOptions
from narrows.runs.logger import LogOptions
from narrows.runs.session import CommonOptions, SubjectOptions, start

GROUPS["decompose"] = ("class-specific filters (\"Decomposing the Deep\"): per-class influential "
                       "channels, the decomposed final layer, essential features, mutual "
                       "information, CSG")


ExtractConfig = compose("ExtractConfig", ExtractOptions, SubjectOptions, CommonOptions)
ValidateConfig = compose("ValidateConfig", ValidateOptions, SubjectOptions, CommonOptions)
FinetuneConfig = compose("FinetuneConfig", FinetuneOptions, SubjectOptions, LogOptions,
                         CommonOptions)


# -- extract ----------------------------------------------------------------------------------
def execute_extract(cfg: ExtractConfig) -> int:
    from narrows.config import flag_name
    from narrows.decompose import Extraction
    from narrows.decompose.pipeline import extract_subject, extraction_k, load_plain_subject

    session = start(cfg)
    subject = load_plain_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    k = extraction_k(subject.model, cfg, flag_name)
    tag = f"f{cfg.fraction:g}" if cfg.fraction else f"k{k}"
    run = session.open(cfg, "decompose extract", "decompose-extract", subject.stem, tag)
    if run.exists("results.json") and run.exists("histogram.pt"):
        session.say(f"already extracted in {run.path}; pass --overwrite to extract again")
        return _report_extract(Extraction.load(run.path), run, session)
    result = extract_subject(subject, cfg, k=k, checkpoint=cfg.checkpoint, device=session.device,
                             progress=cfg.progress, run=run, say=session.say)
    return _report_extract(result, run, session)


def _report_extract(result: Any, run: Any, session: Any) -> int:
    from narrows.decompose.reports import extraction_report

    return session.done(extraction_report(result), f"→ {run.file('indices.json')} (and "
                        "indices_upstream.json, ranking.json, histogram.pt, histogram.png, "
                        "results.json)")


# -- validate ---------------------------------------------------------------------------------
def execute_validate(cfg: ValidateConfig) -> int:
    from narrows.config import flag_name
    from narrows.decompose.pipeline import (
        is_decomposed_checkpoint,
        load_plain_subject,
        validation_report,
    )

    session = start(cfg)
    if cfg.checkpoint and is_decomposed_checkpoint(cfg.checkpoint):
        return _validate_decomposed(cfg, session)
    subject = load_plain_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    tag = Path(cfg.indices).stem if cfg.indices else "full"
    run = session.open(cfg, "decompose validate", "decompose-validate", subject.stem, tag)
    if run.exists("results.json"):
        session.say(f"already validated in {run.path}; pass --overwrite to validate again")
        from narrows.runs.files import reading

        with reading(run.file("results.json"), "cached validate result"):
            return _report_validate(run.read_json("results.json", kind=dict), run, session)
    results = validation_report(subject, cfg, seed=cfg.seed, checkpoint=cfg.checkpoint,
                                device=session.device, progress=cfg.progress, run=run,
                                say=session.say, name=flag_name).results
    return _report_validate(results, run, session)


def _report_validate(results: dict[str, Any], run: Any, session: Any) -> int:
    from narrows.decompose.reports import validation_lines

    where = (f"→ {run.file('accuracy_vs_k.png')}, curve.csv, results.json"
             if "curve_table" in results else f"→ {run.file('results.json')}")
    return session.done(*validation_lines(results), where)


def _validate_decomposed(cfg: ValidateConfig, session: Any) -> int:
    """A fine-tuned decomposed checkpoint: its own accuracy only (its W is stale)."""
    from narrows.decompose.pipeline import decomposed_report
    from narrows.errors import UserError

    if cfg.indices:
        raise UserError(f"{cfg.checkpoint} is decomposed already; its indices are inside it",
                        "drop --indices")
    stem = Path(cfg.checkpoint).parent.name + "-" + Path(cfg.checkpoint).stem
    run = session.open(cfg, "decompose validate", "decompose-validate", stem)
    report = decomposed_report(cfg.checkpoint, name=cfg.model, data=cfg.data,
                               image_size=cfg.image_size, device=session.device,
                               batch_size=cfg.batch_size, workers=cfg.workers,
                               progress=cfg.progress, say=session.say)
    report.save(run)
    session.say("a fine-tuned decomposed model: its original head no longer matches its "
                "backbone, so only the decomposed accuracy is reported")
    return _report_validate(report.results, run, session)


# -- finetune ---------------------------------------------------------------------------------
def execute_finetune(cfg: FinetuneConfig) -> int:
    from narrows.decompose.finetune import DECOMPOSED
    from narrows.decompose.pipeline import finetune_subject, load_plain_subject
    from narrows.decompose.rules import load_indices
    from narrows.errors import UserError

    if not cfg.indices:
        raise UserError("no indices given", "pass --indices FILE (from 'narrows decompose "
                        "extract', or an upstream JSON file)")
    session = start(cfg)
    subject = load_plain_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    indices = load_indices(cfg.indices, subject.model)
    run = session.open(cfg, "decompose finetune", "decompose-finetune", subject.stem,
                       Path(cfg.indices).stem)
    result = finetune_subject(subject, indices, cfg, run, source=cfg.indices,
                              checkpoint=cfg.checkpoint, architecture=cfg.model, seed=cfg.seed,
                              device=session.device, progress=cfg.progress, say=session.say,
                              dist=session.dist)
    if result.final is not None:
        session.say(f"done: decomposed test top-1 {100 * result.final.top1:.2f}% (best "
                    f"{100 * result.best_top1:.2f}%); weights with the indices in "
                    f"{run.file(DECOMPOSED)}")
    return session.done()


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


command(
    "decompose extract", ExtractConfig, execute_extract,
    summary="find each class's influential channels (frequency histograms of top channels)",
    description="For each class, count how often each channel of the pooled last feature layer "
    "(the input of the model's last nn.Linear) is among an image's top k_img positive responses "
    "(channels ranked by their positive spatial means, not an L1 norm), over the images of that "
    "class (one streamed forward pass, nothing of size images×channels kept), and keep the k most frequent "
    "channels (ties: lower id first). Writes indices.json (narrows form with provenance), "
    "indices_upstream.json (the upstream {\"0\": [...]} form), ranking.json, histogram.pt, "
    "histogram.png (heat map) and results.json (top-k mass, selectivity Ψ). A killed run resumes "
    "from its last saved batch.",
    epilog="examples:\n  narrows decompose extract --checkpoint runs/train/resnet20_cifar-digits/"
    "best.pt --k 5\n  narrows decompose extract --checkpoint resnet20-12fca82f.th --model "
    "resnet20_cifar --data cifar10:data --k 5 --layer layer3.2\n  narrows decompose extract "
    "--checkpoint best.pt --fraction 0.5   # variant A")
command(
    "decompose validate", ValidateConfig, execute_validate,
    summary="accuracy of the decomposed final layer, at given indices and as a function of k",
    description="Evaluate the full model and, with --indices, the model whose final layer "
    "reads only each class's channels (V gathered from W, bias copied). The accuracy-vs-k "
    "curve compares histogram indices (--extraction), random channels and each class's "
    "top-|W| weights; at k = D every curve equals the full model exactly. Writes results.json, "
    "curve.csv, curve.json and accuracy_vs_k.png. A decomposed checkpoint from 'finetune' is "
    "evaluated as it is.",
    epilog="examples:\n  narrows decompose validate --checkpoint best.pt --indices "
    "runs/decompose-extract/X/indices.json --extraction runs/decompose-extract/X\n"
    "  narrows decompose validate --checkpoint resnet20-12fca82f.th --model resnet20_cifar "
    "--data cifar10:data --indices resnet20_cifar-10_indices.json")
command(
    "decompose finetune", FinetuneConfig, execute_finetune,
    summary="fine-tune the decomposed network (indices fixed; checkpoint records them)",
    description="Decompose the model's final layer with --indices and fine-tune the whole "
    "network on the decomposed logits (upstream: Adam, constant lr, every parameter but the "
    "original W and b). Checkpoints every epoch (resumable) and writes decomposed.pt: the best "
    "weights with the card and the indices, which 'decompose validate --checkpoint' reads.",
    epilog="example:\n  narrows decompose finetune --checkpoint best.pt --indices indices.json "
    "--epochs 2 --lr 1e-4")
