"""``narrows interactions run | plot | compare``: multi-order interaction strength."""

from __future__ import annotations

from narrows.cli.app import GROUPS, command
from narrows.cli.common import flag_errors
from narrows.config import compose
from narrows.interactions.options import CompareModels, CurveSubject, EstimateOptions, PlotOptions
from narrows.runs.session import CommonOptions, start

GROUPS["interactions"] = ("multi-order interaction strength (representation bottleneck) and "
                          "training with order losses")


RunConfig = compose("RunConfig", EstimateOptions, CurveSubject, CommonOptions)
PlotConfig = compose("PlotConfig", PlotOptions)
CompareConfig = compose("CompareConfig", CompareModels, EstimateOptions, CommonOptions)


def execute_run(cfg: RunConfig) -> int:
    from narrows.interactions.measure import check_settings, measure_into, settings_from_preset

    session = start(cfg)
    subject = cfg.load_subject()
    info = subject.bundle.info
    dataset = subject.bundle.split(cfg.split)
    settings = settings_from_preset(cfg, seed=cfg.seed, extra_meta={
        "model": subject.name, "checkpoint": cfg.checkpoint, "data": info.spec,
        "image_size": info.image_size, "label": cfg.label or subject.name,
        "class_names": list(info.class_names)})
    check_settings(settings, dataset)  # nothing is written before the options are valid
    run = session.open(cfg, "interactions run", "interactions", subject.stem, cfg.preset)
    result = measure_into(run, subject.model, dataset, info.num_classes, settings, subject.mean,
                          subject.std, device=session.device, dist=session.dist,
                          progress=cfg.progress, say=session.say,
                          at_init=cfg.checkpoint is None, class_names=list(info.class_names),
                          split=cfg.split)
    if session.dist.is_main:
        session.say(result.summary())
        session.say(f"→ {run.file('curve.csv')}, {run.file('curve.png')}, "
                    f"{run.file('meta.json')}")
    return session.done()


def execute_plot(cfg: PlotConfig) -> int:
    from narrows.interactions.result import plot_runs

    with flag_errors():
        out = plot_runs(cfg.runs, cfg.out, cfg.labels, normalize=cfg.normalize,
                        debiased=cfg.debiased, title=cfg.title)
    print(f"→ {out}")
    return 0


def execute_compare(cfg: CompareConfig) -> int:
    from narrows.interactions.measure import (
        check_settings,
        compare_models,
        model_entries,
        settings_from_preset,
    )
    from narrows.models.subject import load_subject

    entries = model_entries(cfg.models)
    session = start(cfg)
    first = load_subject(entries[0][1], entries[0][2], cfg.data, cfg.image_size)
    check_settings(settings_from_preset(cfg, seed=cfg.seed), first.bundle.split(cfg.split))
    run = session.open(cfg, "interactions compare", "interactions", "compare")
    compare_models(entries, run, data=first.bundle.info.spec, image_size=cfg.image_size,
                   settings_of=lambda meta: settings_from_preset(cfg, seed=cfg.seed,
                                                                 extra_meta=meta),
                   device=session.device, dist=session.dist, progress=cfg.progress,
                   say=session.say, split=cfg.split, first=first)
    if run.writer:
        session.say(f"\n→ {run.file('compare.png')}")
    return session.done()


command(
    "interactions run", RunConfig, execute_run,
    summary="measure the multi-order interaction strength J(m) of a model",
    description="Estimate the multi-order interactions I^(m)(i,j) of a classifier on images of a "
    "data set and the relative strength J of each order (Deng et al., ICLR 2022). Prints the "
    "planned forward passes and an estimated time first; each finished image is saved, so a "
    "killed run resumes where it stopped. Writes meta.json, dv.npy, pairs.npy, curve.csv and "
    "curve.png to --out.",
    epilog="examples:\n  narrows interactions run --checkpoint runs/train/resnet20_cifar-digits/"
    "best.pt --preset cpu-small\n  narrows interactions run --model resnet20_cifar --data digits "
    "--preset cpu-small --no-only-correct   # at initialisation\n  narrows interactions run --checkpoint "
    "alexnet.pt --model alexnet_cifar --data cifar10:data --preset paper-cifar --device cuda")
command(
    "interactions plot", PlotConfig, execute_plot,
    summary="overlay the J curves of finished runs in one figure",
    description="Overlay the interaction curves of one or more 'interactions run' directories.",
    epilog="example:\n  narrows interactions plot runs/interactions/a runs/interactions/b "
    "--labels trained init --out fig.png")
command(
    "interactions compare", CompareConfig, execute_compare,
    summary="run several models on the same images, pairs and contexts and overlay them",
    description="Compare models on identical images, pairs and contexts (the upstream "
    "interaction_in1k.sh use). Give the models in --config FILE.yaml:\n\n"
    "  data: digits\n  preset: cpu-small\n  models:\n    - trained=runs/train/resnet20_cifar-digits/"
    "best.pt\n    - init=runs/train/resnet20_cifar-digits/init.pt\n\nEach model's run is kept in "
    "--out/LABEL (resumable); the overlay is --out/compare.png.")
