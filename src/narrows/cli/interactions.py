"""``narrows interactions run | plot | compare``: multi-order interaction strength."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, SubjectOptions, open_run, start
from narrows.config import fraction, increasing, not_empty, option, positive

GROUPS["interactions"] = ("multi-order interaction strength (representation bottleneck) and "
                          "training with order losses")
PRESET_NAMES = Literal["paper-cifar", "fork-imagenet", "cpu-small", "smoke"]


@dataclass
class EstimateOptions:
    """What every estimate takes: the preset and its overrides."""

    preset: PRESET_NAMES = option("cpu-small", "settings: paper-cifar (grid 16, 200 pairs, 100 "
                                  "contexts, 50 images), fork-imagenet (14/50/50/500), cpu-small "
                                  "(8/20/20/10), smoke (4/4/4/2, plumbing only)")
    grid: int | None = option(None, "players on a GRID×GRID patch grid [preset]", check=positive)
    pairs: int | None = option(None, "pairs per image [preset]", check=positive)
    contexts: int | None = option(None, "contexts K per pair and order [preset]", check=positive)
    ratios: list[float] | None = option(None, "orders as fractions r of n − 2 [preset: the 13 "
                                        "upstream ratios]",
                                        check=fraction.also(not_empty, increasing))
    images: int | None = option(None, "images to explain: the first of each class [preset]",
                                check=positive)
    pair_sampling: Literal["neighbour", "uniform"] = option(
        "neighbour", "neighbour: j within --radius of i (upstream); uniform: any two players")
    radius: int = option(2, "neighbourhood radius (Chebyshev) for neighbour pairs",
                         check=positive)
    reward: Literal["logodds", "logprob", "logit"] = option(
        "logodds", "v(S): log-odds (upstream), log-probability or logit of the true class")
    baseline: Literal["mean", "zero"] = option("mean", "masked patches become the data set's "
                                               "mean colour (upstream) or black")
    only_correct: bool = option(True, "keep only images the model classifies correctly "
                                "(upstream)")
    split: Literal["train", "test"] = option("train", "split the images come from (upstream: "
                                             "train)")
    batch_size: int = option(64, "masked images per forward pass", check=positive,
                             affects_result=False)


@dataclass
class CurveSubject(SubjectOptions):
    label: str | None = option(None, "name of this curve in plots [default: the model]",
                               affects_result=False)


@dataclass
class RunConfig(EstimateOptions, CurveSubject, CommonOptions):
    pass


def settings_for(cfg: EstimateOptions, seed: int, extra: dict):
    from narrows.interactions.presets import PRESETS
    from narrows.interactions.runner import InteractionSettings

    preset = PRESETS[cfg.preset]

    def pick(name: str):
        value = getattr(cfg, name)
        return preset[name] if value is None else value

    return InteractionSettings(
        grid=pick("grid"), pairs=pick("pairs"), contexts=pick("contexts"),
        ratios=tuple(pick("ratios")), images=pick("images"), pair_sampling=cfg.pair_sampling,
        radius=cfg.radius, reward=cfg.reward, baseline=cfg.baseline,
        only_correct=cfg.only_correct, batch_size=cfg.batch_size, seed=seed,
        extra_meta={"preset": cfg.preset, "split": cfg.split, **extra},
    )


def check_settings(settings, dataset) -> None:
    """Everything about the options that can be checked before a model runs or a file is
    written: ratios, counts, pairs on the grid, and the grid against the image size."""
    from narrows.errors import UserError

    if len(dataset) == 0:
        raise UserError("the data set has no images to explain", "check --data and --split")
    image = dataset[0][0]
    settings.check_image(*image.shape[1:])


def estimate_into(run, net, dataset, num_classes: int, settings, mean, std, session, progress,
                  image_ids=None, say=print, *, at_init: bool = False, candidates=None,
                  class_names=None, split: str = "train"):
    """Plan (printing the sample and the cost), run with per-image resume, save the result in
    ``run``. ``image_ids`` (with their ``candidates`` count): images chosen before, with
    another model. Prints one warning line when the model's output does not depend on the
    patches (then J is undefined and no curve is drawn)."""
    from narrows.interactions.players import PlayerGrid
    from narrows.interactions.runner import (
        constant_output_cause,
        constant_reward,
        full_and_empty_values,
        measure_speed,
        plan,
    )
    from narrows.interactions.runner import run as run_images
    from narrows.runtime import format_duration
    from narrows.training import Normalizer

    normalizer = Normalizer(mean, std)
    p = plan(net.to(session.device), dataset, num_classes, settings, normalizer, session.device,
             image_ids, candidates)
    if not p.image_ids:
        from narrows.errors import UserError

        raise UserError(f"none of the {p.candidates} candidate images is classified correctly"
                        + (" (the model is at initialisation)" if at_init else ""),
                        "pass --no-only-correct, or use more --images")
    if image_ids is None:
        say(f"images: {p.describe(settings.only_correct, class_names)} — the first of each "
            f"class in the {split} split")
        note = p.shrunk(settings.only_correct, at_init)
        if note:
            say(note)
    warned = False
    if session.dist.is_main:
        values = full_and_empty_values(net, dataset, p.image_ids, settings, mean=mean, std=std,
                                       device=session.device)
        if constant_reward(values):
            say("warning: the model's output is the same with every patch kept and every patch "
                f"masked on all {len(p.image_ids)} images, so its interactions are likely all 0: "
                f"{constant_output_cause(net, at_init)}")
            warned = True
    images_dir = run.file("images")
    finished = sum((images_dir / f"{i:07d}.npz").is_file() for i in p.image_ids)
    image = dataset[p.image_ids[0]][0]
    channels_last = session.device.type == "cpu"  # faster convolutions; same values
    speed = measure_speed(net, PlayerGrid(settings.grid, *image.shape[1:]),
                          normalizer(image[None])[0], settings.batch_size, session.device,
                          channels_last)
    todo = (len(p.image_ids) - finished) * p.forwards_per_image
    say(f"{p.forwards_per_image:,} forward passes each ({p.upstream_per_image:,} without the "
        f"exact shortcuts); {finished} of {len(p.image_ids)} images already done; {todo:,} to "
        f"go ≈ {format_duration(todo / speed)} at {speed:,.0f} forwards/s")
    result = run_images(net, dataset, p, settings, mean=mean, std=std, device=session.device,
                        images_dir=images_dir, dist=session.dist, progress=progress,
                        channels_last=channels_last, at_init=at_init)
    if run.writer:
        result.save(run.path)
        warning = result.warning()
        if warning and not warned:
            say(f"warning: no curve — {warning}")
    return result


def execute_run(cfg: RunConfig) -> int:
    from narrows.runs import default_out

    session = start(cfg)
    from narrows.models.subject import load_subject

    subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    bundle = subject.bundle
    dataset = bundle.split(cfg.split)
    class_names = list(bundle.info.class_names)
    settings = settings_for(cfg, cfg.seed, {"model": subject.name, "checkpoint": cfg.checkpoint,
                                            "data": bundle.info.spec,
                                            "image_size": bundle.info.image_size,
                                            "label": cfg.label or subject.name,
                                            "class_names": class_names})
    check_settings(settings, dataset)  # nothing is written before the options are valid
    run = open_run(cfg, "interactions run",
                   default_out("interactions", subject.stem, cfg.preset), session)
    say = session.say
    result = estimate_into(run, subject.model, dataset, bundle.info.num_classes, settings,
                           subject.mean, subject.std, session, cfg.progress, say=say,
                           at_init=cfg.checkpoint is None, class_names=class_names,
                           split=cfg.split)
    if session.dist.is_main:
        if result.degenerate() is None:
            j = result.J()
            say("J (sampled): " + " ".join(f"{r:g}:{v:.2f}" for r, v in zip(result.ratios, j,
                                                                            strict=True)))
        say(f"→ {run.file('curve.csv')}, {run.file('curve.png')}, {run.file('meta.json')}")
    session.close()
    return 0


@dataclass
class PlotConfig:
    runs: list[str] = option([], "directories of finished 'interactions run's", positional=True,
                             metavar="DIR")
    out: str = option("interactions.png", "figure file (.png, .pdf, .svg)", metavar="FILE")
    labels: list[str] | None = option(None, "one legend label per DIR [default: each run's label]")
    normalize: Literal["sampled", "uniform"] = option(
        "sampled", "J's normaliser: mean of A over the evaluated ratios (upstream) or the "
        "integral of A over r")
    debiased: bool = option(False, "plot the debiased estimate sqrt(max(0, I² − s²/K))")
    title: str | None = option(None, "figure title")


def execute_plot(cfg: PlotConfig) -> int:
    from narrows.errors import UserError
    from narrows.interactions.result import InteractionResult, plot_curves
    from narrows.plotting import pyplot
    from narrows.runs import atomic_savefig

    if not cfg.runs:
        raise UserError("no run directories given", "narrows interactions plot DIR [DIR ...]")
    if cfg.labels and len(cfg.labels) != len(cfg.runs):
        raise UserError(f"{len(cfg.labels)} labels for {len(cfg.runs)} runs",
                        "give one --labels entry per DIR")
    results = [InteractionResult.load(d) for d in cfg.runs]
    for directory, result in zip(cfg.runs, results, strict=True):
        warning = result.warning()
        if warning:
            print(f"warning: {directory} is left out of the figure — {warning}")
    fig, _ = plot_curves(results, cfg.labels, normalize=cfg.normalize, debiased=cfg.debiased,
                         title=cfg.title)
    out = Path(cfg.out)
    if not out.suffix:  # matplotlib would write PNG bytes under a name without an extension
        out = out.with_suffix(".png")
    atomic_savefig(out, fig, dpi=150, bbox_inches="tight")
    pyplot().close(fig)
    print(f"→ {out}")
    return 0


@dataclass
class CompareConfig(EstimateOptions, CommonOptions):
    models: list[str] = option([], "LABEL=CHECKPOINT or LABEL=MODEL_NAME (random init) entries; "
                               "the images are chosen once, with the first model")
    data: str | None = option(None, "data spec [default: the first checkpoint's data]",
                              short="-d")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data",
                                    check=positive)


def execute_compare(cfg: CompareConfig) -> int:
    from narrows.errors import UserError
    from narrows.interactions.result import plot_curves
    from narrows.interactions.runner import select
    from narrows.plotting import pyplot
    from narrows.runs import RunDir, default_out
    from narrows.runs.run import safe_name
    from narrows.training import Normalizer

    if len(cfg.models) < 1:
        raise UserError("no models to compare", "list them under 'models:' in --config, as "
                        "LABEL=CHECKPOINT or LABEL=MODEL_NAME")
    entries = [_entry(text) for text in cfg.models]
    labels = [safe_name(e[0], "model label") for e in entries]  # each is --out/LABEL
    if len(set(labels)) != len(labels):
        raise UserError("two models share a label", "give every model its own LABEL")
    session = start(cfg)
    _, checkpoint, model = entries[0]
    from narrows.models.subject import load_subject

    first = load_subject(checkpoint, model, cfg.data, cfg.image_size)
    data = first.bundle.info.spec
    check_settings(settings_for(cfg, cfg.seed, {}), first.bundle.split(cfg.split))
    run = open_run(cfg, "interactions compare", default_out("interactions", "compare"), session)
    say = session.say
    results, image_ids, candidates = [], None, None
    for k, (label, checkpoint, model) in enumerate(entries):
        subject = first if k == 0 else load_subject(checkpoint, model, data, cfg.image_size)
        net, bundle, mean, std, name = (subject.model, subject.bundle, subject.mean, subject.std,
                                        subject.name)
        class_names = list(bundle.info.class_names)
        settings = settings_for(cfg, cfg.seed, {"model": name, "checkpoint": checkpoint,
                                                "data": data, "label": label,
                                                "image_size": bundle.info.image_size,
                                                "class_names": class_names})
        dataset = bundle.split(cfg.split)
        say(f"\n== {label}: {name}")
        chosen_here = image_ids is None
        if chosen_here:
            image_ids, _, candidates = select(net.to(session.device), dataset,
                                              bundle.info.num_classes, settings,
                                              Normalizer(mean, std), session.device)
            if not image_ids:
                raise UserError(f"none of the {candidates} candidate images is classified "
                                f"correctly by {label} (the images are chosen with the first "
                                "model)", "pass --no-only-correct, list another model first, "
                                "or use more --images")
        result_options = {"checkpoint": checkpoint, "model": model, "images": list(image_ids),
                          "settings": repr(settings)}
        sub = (RunDir.open(run.path / label, "interactions run", {"label": label}, result_options)
               if session.dist.is_main else RunDir(run.path / label, writer=False))
        results.append(estimate_into(
            sub, net, dataset, bundle.info.num_classes, settings, mean, std, session,
            cfg.progress, None if chosen_here else image_ids, say,
            at_init=checkpoint is None, candidates=None if chosen_here else candidates,
            class_names=class_names, split=cfg.split))
    if run.writer:
        fig, _ = plot_curves(results, labels, title="multi-order interactions")
        run.save_figure("compare.png", fig)
        pyplot().close(fig)
        say(f"\n→ {run.file('compare.png')}")
    session.close()
    return 0


def _entry(text: str) -> tuple[str, str | None, str | None]:
    from narrows.errors import UserError

    label, sep, target = text.partition("=")
    if not sep or not label or not target:
        raise UserError(f"model entry '{text}' is not LABEL=CHECKPOINT or LABEL=MODEL_NAME",
                        "e.g. trained=runs/train/resnet20_cifar-digits/best.pt")
    is_file = Path(target).suffix in (".pt", ".pth", ".th", ".tar", ".bin", ".safetensors")
    return (label, target, None) if is_file else (label, None, target)


register(Command(
    words=("interactions", "run"),
    summary="measure the multi-order interaction strength J(m) of a model",
    description="Estimate the multi-order interactions I^(m)(i,j) of a classifier on images of a "
    "data set and the relative strength J of each order (Deng et al., ICLR 2022). Prints the "
    "planned forward passes and an estimated time first; each finished image is saved, so a "
    "killed run resumes where it stopped. Writes meta.json, dv.npy, pairs.npy, curve.csv and "
    "curve.png to --out.",
    config=RunConfig,
    target="narrows.cli.interactions:execute_run",
    epilog="examples:\n  narrows interactions run --checkpoint runs/train/resnet20_cifar-digits/"
    "best.pt --preset cpu-small\n  narrows interactions run --model resnet20_cifar --data digits "
    "--preset cpu-small --no-only-correct   # at initialisation\n  narrows interactions run --checkpoint "
    "alexnet.pt --model alexnet_cifar --data cifar10:data --preset paper-cifar --device cuda",
))
register(Command(
    words=("interactions", "plot"),
    summary="overlay the J curves of finished runs in one figure",
    description="Overlay the interaction curves of one or more 'interactions run' directories.",
    config=PlotConfig,
    target="narrows.cli.interactions:execute_plot",
    epilog="example:\n  narrows interactions plot runs/interactions/a runs/interactions/b "
    "--labels trained init --out fig.png",
))
register(Command(
    words=("interactions", "compare"),
    summary="run several models on the same images, pairs and contexts and overlay them",
    description="Compare models on identical images, pairs and contexts (the upstream "
    "interaction_in1k.sh use). Give the models in --config FILE.yaml:\n\n"
    "  data: digits\n  preset: cpu-small\n  models:\n    - trained=runs/train/resnet20_cifar-digits/"
    "best.pt\n    - init=runs/train/resnet20_cifar-digits/init.pt\n\nEach model's run is kept in "
    "--out/LABEL (resumable); the overlay is --out/compare.png.",
    config=CompareConfig,
    target="narrows.cli.interactions:execute_compare",
))
