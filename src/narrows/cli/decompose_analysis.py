"""``narrows decompose essential | mutual-info | csg-train``: testing and comparing index sets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from narrows.cli.app import GROUPS, command
from narrows.cli.train import TrainConfig
from narrows.config import compose, option
from narrows.decompose.options import CSGTrainOptions, EssentialOptions, MutualInfoOptions
from narrows.errors import UserError
from narrows.runs.session import CommonOptions, SubjectOptions, start
from narrows.training.settings import DATA_HELP

GROUPS.setdefault("decompose", "influential filters per class ('Decomposing the Deep'): "
                  "extraction, the decomposed head, essential features, MI, CSG baseline")


EssentialConfig = compose("EssentialConfig", EssentialOptions, SubjectOptions, CommonOptions)
MutualInfoConfig = compose("MutualInfoConfig", MutualInfoOptions, SubjectOptions, CommonOptions)


@dataclass
class CSGTrainConfig(CSGTrainOptions, TrainConfig):
    data: str | None = option(None, DATA_HELP + " [default: the data of --checkpoint, else "
                              "digits]", short="-d")


# -- essential -------------------------------------------------------------------------------

def execute_essential(cfg: EssentialConfig) -> int:
    from narrows.decompose.compare import essential_comparison, essential_sets

    if not cfg.indices and not cfg.csg_checkpoint:
        raise UserError("nothing to test", "pass --indices FILE with --checkpoint FILE, "
                        "and/or --csg-checkpoint FILE")
    if cfg.indices and not (cfg.checkpoint or cfg.model):
        raise UserError("--indices needs the model they were extracted from",
                        "pass --checkpoint FILE (or --model NAME for initial weights)")
    session = start(cfg)
    subject = cfg.load_subject() if cfg.indices else None
    tested = essential_sets(cfg, subject=subject, data=cfg.data, model_name=cfg.model,
                            image_size=cfg.image_size, k_name="--k")
    stem = Path(cfg.checkpoint or cfg.csg_checkpoint or cfg.model or "model").stem
    run = session.open(cfg, "decompose essential", "decompose", "essential", stem)
    comparison = essential_comparison(tested, cfg, seed=cfg.seed, device=session.device,
                                      progress=cfg.progress, cache_dir=run.path)
    comparison.save(run)
    files = [f"{run.file('results_essential_features.json')} (σ = {comparison.level:g})",
             *map(run.file, ("essential.csv", "essential.md", "essential.png"))]
    return _report(session, comparison.table(), files)


def _report(session: Any, text: str, files: list[Any]) -> int:
    """Print ``text`` and the files written (on every rank), then close."""
    print(text, end="")
    print("→ " + ", ".join(map(str, files)))
    return session.done()


# -- mutual information ----------------------------------------------------------------------

def execute_mutual_info(cfg: MutualInfoConfig) -> int:
    from narrows.decompose.csg import load_csg_subject
    from narrows.decompose.mi_compare import mutual_info_comparison

    if not cfg.indices and not cfg.csg_checkpoint:
        raise UserError("no index sets given", "pass --indices FILE... and/or "
                        "--csg-checkpoint FILE")
    if cfg.mis and not (cfg.checkpoint or cfg.csg_checkpoint):
        raise UserError("--mis needs a model", "pass --checkpoint and/or --csg-checkpoint")
    session = start(cfg)
    subject = cfg.load_subject() if cfg.checkpoint or cfg.model else None
    csg = load_csg_subject(cfg.csg_checkpoint, name=cfg.model, image_size=cfg.image_size,
                           data=cfg.data or (subject.bundle.info.spec if subject else None)
                           ) if cfg.csg_checkpoint else None
    stem = Path(cfg.checkpoint or cfg.csg_checkpoint or cfg.indices[0]).stem
    run = session.open(cfg, "decompose mutual-info", "decompose", "mutual-info", stem)
    comparison = mutual_info_comparison(
        cfg, subject=subject, csg=csg, seed=cfg.seed,
        mis_models=("ours", "csg") if cfg.checkpoint else ("csg",), device=session.device,
        progress=cfg.progress, run=run)
    comparison.save(run, diagonal=cfg.diagonal)
    files = [run.file(f"mutual_info.{suffix}") for suffix in ("md", "csv", "json", "png")]
    return _report(session, comparison.markdown(), files)


# -- csg-train -------------------------------------------------------------------------------

def execute_csg_train(cfg: CSGTrainConfig) -> int:
    from narrows.cli.train import open_training_run, prepare
    from narrows.decompose.csg_train import csg_options, train_csg
    from narrows.training import TrainSettings
    from narrows.training.setup import checkpoint_data

    session = start(cfg)
    if session.dist.enabled:
        raise UserError("csg-train runs in one process (the gate is unused in ordinary "
                        "epochs, which DDP does not allow)", "run it without torchrun")
    options = csg_options(cfg)
    options.check()
    cfg = replace(cfg, data=cfg.data or checkpoint_data(cfg.checkpoint))
    model, card, data = prepare(cfg)
    run = open_training_run(cfg, session, "decompose csg-train", "decompose-csg-train",
                            card.architecture, cfg.data)
    settings = TrainSettings.from_options(cfg, seed=cfg.seed)
    summary = train_csg(model, card, data, settings, options, run=run, device=session.device,
                        dist=session.dist, progress=cfg.progress, say=session.say,
                        threads=session.threads, spec=cfg.data)
    top1 = f"{100 * summary['std_top1']:.2f}%" if summary["std_top1"] is not None else "n/a"
    session.say(f"done: test top-1 (ordinary path) {top1}, gate density "
                f"{summary['gate_density']:.3f}; network + gate in {summary['csg']}, top-"
                f"{cfg.k} gates in {summary['indices']}, figure {run.file('gate.png')}")
    return session.done()


command(
    "decompose essential", EssentialConfig, execute_essential,
    summary="noise on each class's influential channels vs the others vs a random control",
    description="For each image, replace (or perturb) with Gaussian noise the pooled features "
    "at its class's influential channels (I_c), at all the other channels, and at |I_c| random "
    "other channels (an equal-size control upstream lacks), then count the images the full "
    "linear layer still classifies correctly, per class and noise level. Seeded per image. "
    "Writes results_essential_features.json (the upstream schema, with extra keys), "
    "essential.csv/.md, essential.png; each model's counts are kept, so re-running resumes.",
    epilog="examples:\n"
    "  narrows decompose essential --checkpoint best.pt --indices inds.json\n"
    "  narrows decompose essential --checkpoint resnet20-12fca82f.th -m resnet20_cifar "
    "-d cifar10:data --indices resnet20_cifar-10_indices.json --sigma 1\n"
    "  narrows decompose essential --checkpoint best.pt --indices inds.json "
    "--csg-checkpoint runs/decompose-csg-train/.../csg.pt --csg-order both")

command(
    "decompose mutual-info", MutualInfoConfig, execute_mutual_info,
    summary="pairwise MI of class index sets (upstream score and corrected), over k",
    description="Scores how much the classes' index sets share: the upstream mean pairwise "
    "MI of the indicator vectors with the diagonal (for parity), the same without the "
    "diagonal (the corrected score: the diagonal is each class's entropy, a constant of k), "
    "the mean Jaccard overlap and the union size, for each k and each source (our indices, "
    "CSG gates, random sets). --mis adds the CSG paper's MIS of the model(s). Writes "
    "mutual_info.md/.csv/.json and mutual_info.png.",
    epilog="examples:\n"
    "  narrows decompose mutual-info --indices inds5.json inds10.json inds20.json "
    "--channels 64\n"
    "  narrows decompose mutual-info --checkpoint best.pt --indices inds.json --ks 5 10 20 "
    "--csg-checkpoint csg.pt --csg-order both --mis")

command(
    "decompose csg-train", CSGTrainConfig, execute_csg_train,
    summary="train with a class-specific gate (CSG baseline, Liang et al. 2020)",
    description="Train as 'narrows train' does, adding a gate G (classes × channels) on the "
    "pooled features: the CSG path classifies h ⊙ G[y] with the same linear layer, with a "
    "hinge on |G|_1 pushing the gate towards --target-density. Inference uses the ordinary "
    "path. metrics.jsonl gains csg_epoch, std_ce, csg_ce, csg_top1, gate_density and "
    "gate_hinge. Writes csg.pt (the network with its card, loadable anywhere, and the gate), "
    "indices_csg.json (each class's largest gates) and gate.png; resumable.",
    epilog="examples:\n"
    "  narrows decompose csg-train --checkpoint runs/train/resnet20_cifar-digits/best.pt "
    "--epochs 4 --lr 0.01\n"
    "  narrows decompose csg-train -d cifar10:data --epochs 200 --period 3 --schedule "
    "alternate --clip official --target-density 0.2")
