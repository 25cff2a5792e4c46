"""``narrows attribution stats | explain | evaluate``: IBA heatmaps, baselines and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from narrows.attribution.options import (
    DEFAULT_METRICS,
    EvaluateOptions,
    ExplainOptions,
    IBAOptions,
    ImageChoice,
    LayerOption,
    StatisticsOptions,
    StatsOptions,
)
from narrows.cli.app import GROUPS, command
from narrows.config import compose
from narrows.runs.session import CommonOptions, SubjectOptions, start

GROUPS["attribution"] = ("Information Bottleneck Attribution (IBA) heatmaps, Captum baselines "
                         "and their evaluation (degradation, bounding boxes, sensitivity-n)")


@dataclass
class LayerSubject(LayerOption, SubjectOptions):
    """Which model, on which data, at which layer (listed first in --help)."""


StatsConfig = compose("StatsConfig", StatsOptions, StatisticsOptions, LayerSubject, CommonOptions)
ExplainConfig = compose("ExplainConfig", ExplainOptions, ImageChoice, IBAOptions,
                        StatisticsOptions, LayerSubject, CommonOptions)
EvaluateConfig = compose("EvaluateConfig", EvaluateOptions, ImageChoice, IBAOptions,
                         StatisticsOptions, LayerSubject, CommonOptions)


# -- shared ----------------------------------------------------------------------------------

#: how library messages name the parameters on this command line
FLAGS = {"layer": "--layer", "cam_layer": "--cam-layer", "method": "--method",
         "readout": "--readout FILE", "indices": "--indices", "n_samples": "--n-samples N",
         "metrics": "--metrics", "tile": "--tile"}
STALE = "the model changed since this run: rerun with --overwrite, or pass another --out"


def subject(cfg: LayerSubject):
    """(model in eval mode, data bundle, normaliser, description, output stem)."""
    from narrows.training import Normalizer

    loaded = cfg.load_subject()
    return (loaded.model.eval(), loaded.bundle, Normalizer(loaded.mean, loaded.std),
            loaded.name, loaded.stem)


def statistics(cfg, net, bundle, normalizer, session, path: Path, split: str = "train",
               re_estimate: bool = False):
    """IBA's statistics: ``--statistics``, or ``path``, or estimated into ``path``."""
    from narrows.attribution.statistics import statistics_for

    return statistics_for(net, bundle.split(split), normalizer, path, cfg, seed=cfg.seed,
                          device=session.device, split=split, re_estimate=re_estimate,
                          stale_fix=STALE, names=FLAGS)


def checked_images(cfg, methods: list[str], net, dataset, normalizer):
    """``(indices, probe)``: ``--indices`` if given, else ``--images`` test images chosen by
    ``--select``, and the first one normalised, on which ``methods`` are checked (what can
    fail, before --out is written)."""
    from narrows.attribution.images import image_batch, pick_indices
    from narrows.attribution.methods import MethodSettings, check_methods

    indices = pick_indices(dataset, cfg.images, getattr(cfg, "indices", None), seed=cfg.seed,
                           select=cfg.select, names=FLAGS)
    probe = normalizer(image_batch(dataset, indices[:1])[0])
    check_methods(methods, net, MethodSettings.from_options(cfg, cfg.seed), cfg.statistics,
                  probe, names=FLAGS)
    return indices, probe


# -- stats -----------------------------------------------------------------------------------

def execute_stats(cfg: StatsConfig) -> int:
    from narrows.runs.results import flat_summary

    session = start(cfg)
    net, bundle, normalizer, name, stem = subject(cfg)
    run = session.open(cfg, "attribution stats", "attribution", "stats", stem)
    path = run.file("statistics.pt")
    reused = path.is_file()
    stats = statistics(cfg, net, bundle, normalizer, session, path, cfg.split)
    run.write_json("results.json", flat_summary(stats, command="attribution stats"))
    print(f"{'reused' if reused else 'estimated'} statistics of {name}: n={stats.n:,}, "
          f"layer={stats.layer}, feature shape={tuple(stats.shape or ())}, kind={stats.kind}")
    print(f"→ {path}, {run.file('results.json')}")
    return 0


# -- explain ---------------------------------------------------------------------------------

def execute_explain(cfg: ExplainConfig) -> int:
    from narrows.attribution.explain import explain_images
    from narrows.attribution.methods import check_readout_given
    from narrows.attribution.methods import method_names as registered
    from narrows.errors import UserError

    if cfg.method not in registered():
        raise UserError(f"unknown attribution method '{cfg.method}'",
                        f"choose from {', '.join(registered())}")
    if cfg.gif and cfg.method != "iba":
        raise UserError("--gif shows IBA's optimisation steps", "use --method iba, or drop --gif")
    check_readout_given([cfg.method], cfg.readout, FLAGS)
    session = start(cfg)
    net, bundle, normalizer, name, stem = subject(cfg)
    dataset = bundle.split("test")
    indices, _ = checked_images(cfg, [cfg.method], net, dataset, normalizer)
    run = session.open(cfg, "attribution explain", "attribution", "explain", stem, cfg.method)
    net.to(session.device)
    stats = (statistics(cfg, net, bundle, normalizer, session, run.file("statistics.pt"))
             if cfg.method == "iba" else None)
    explain_images(net, dataset, indices, cfg.method, run, normalizer=normalizer, options=cfg,
                   statistics=stats, device=session.device, progress=cfg.progress,
                   class_names=bundle.info.class_names, name=name, data=bundle.info.spec)
    print(f"→ {run.file('heatmap_<index>.png')} ({len(indices)}), {run.file('heatmaps.npz')}"
          + (f", {run.file('iba_<index>.gif')}" if cfg.gif else ""))
    return 0


# -- evaluate --------------------------------------------------------------------------------

def execute_evaluate(cfg: EvaluateConfig) -> int:
    from narrows.attribution.evaluation import (
        METRICS,
        check_tile,
        evaluate_methods,
        resolve_metrics,
    )
    from narrows.attribution.methods import check_readout_given, parse_names

    methods = parse_names(cfg.methods)
    chosen = parse_names(cfg.metrics or DEFAULT_METRICS, "metrics", METRICS)
    check_readout_given(methods, cfg.readout, FLAGS)
    session = start(cfg)
    net, bundle, normalizer, name, stem = subject(cfg)
    dataset = bundle.split("test")
    metrics = resolve_metrics(dataset, bundle.info.spec, chosen if cfg.metrics is not None else None,
                              FLAGS)
    indices, probe = checked_images(cfg, methods, net, dataset, normalizer)
    check_tile(cfg.tile, tuple(probe.shape[-2:]), metrics, FLAGS)
    run = session.open(cfg, "attribution evaluate", "attribution", "evaluate", stem)
    net.to(session.device)
    stats = (statistics(cfg, net, bundle, normalizer, session, run.file("statistics.pt"))
             if "iba" in methods else None)
    result = evaluate_methods(net, dataset, indices, methods, run, normalizer=normalizer,
                              options=cfg, statistics=stats, metrics=metrics,
                              device=session.device, progress=cfg.progress,
                              class_names=bundle.info.class_names, name=name)
    print(result.table)
    print("→ " + ", ".join(str(f) for f in result.files))
    return 0


# -- quickstart ------------------------------------------------------------------------------

QUICKSTART_DATA = "shapes:classes=4,size=32,train=2000,test=200"
QUICKSTART_EPOCHS = 10
QUICKSTART_IMAGES = 16


def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """Train ResNet-20 on shapes, then evaluate IBA against baselines and draw a few heatmaps.

    AdamW (lr 2e-3) rather than the SGD default: ResNet-20 learns the shapes in 10 epochs with
    it (about 95 % test accuracy), with SGD at lr 0.1 it is still near chance after 10.
    Without Captum (the extra narrows[baselines]) only IBA and Random are compared.
    """
    import importlib.util

    from narrows.cli.train import TrainConfig, run_training

    train = out / "shapes-train"
    run_training(TrainConfig(model="resnet20_cifar", data=QUICKSTART_DATA,
                             epochs=QUICKSTART_EPOCHS, batch_size=64, optimizer="adamw", lr=2e-3,
                             **cfg.inherited(train)), "train")
    checkpoint = str(train / "best.pt")
    target = out / "attribution"
    captum = importlib.util.find_spec("captum") is not None
    methods = "iba,saliency,gradcam,random" if captum else "iba,random"
    if not captum:
        print("captum is not installed: comparing IBA with Random only "
              "(pip install 'narrows[baselines]' for saliency and Grad-CAM)")
    execute_evaluate(EvaluateConfig(checkpoint=checkpoint, methods=methods,
                                    metrics="degradation,bbox", images=QUICKSTART_IMAGES,
                                    select="first",
                                    points=50, n_samples=2000,
                                    **cfg.inherited(target / "evaluate")))
    # shapes cycles through its classes, so its first images are already spread over them
    execute_explain(ExplainConfig(checkpoint=checkpoint, images=4, gif=True, select="first",
                                  statistics=str(target / "evaluate" / "statistics.pt"),
                                  **cfg.inherited(target / "explain")))
    return (f"IBA vs {methods.split(',', 1)[1].replace(',', ', ')} on shapes "
            f"({QUICKSTART_IMAGES} images): {target / 'evaluate' / 'results.md'} and "
            f"examples.png; IBA heatmaps and GIFs: {target / 'explain'}")


command(
    "attribution stats", StatsConfig, execute_stats,
    summary="estimate the feature statistics IBA needs at a layer",
    description="Run the model up to the bottleneck layer over training images and save the "
    "per-element mean and standard deviation (statistics.pt in --out; re-running reuses it).",
    epilog="example:\n  narrows attribution stats --checkpoint runs/train/resnet20_cifar-digits/"
    "best.pt --n-samples 10000")
command(
    "attribution explain", ExplainConfig, execute_explain,
    summary="draw IBA (or baseline) heatmaps of test images",
    description="Explain test images of the checkpoint's data (spread over the classes, see "
    "--select) with IBA (Schulz et al., ICLR 2020) or a baseline, towards each image's label. "
    "Writes heatmap_<index>.png (overlay: IBA in bits per pixel, signed methods on a diverging "
    "scale centred at 0), heatmaps.npz (all maps, indices, targets and their class names), "
    "result/ (the AttributionResult, with the method's units and parameters) and, "
    "with --gif, iba_<index>.gif of the optimisation steps. Finished images are skipped on a "
    "rerun. Without --statistics, IBA estimates them into --out/statistics.pt first.",
    epilog="examples:\n  narrows attribution explain --checkpoint best.pt --images 8 --gif\n"
    "  narrows attribution explain --checkpoint best.pt --method gradcam --indices 3 14 15")
command(
    "attribution evaluate", EvaluateConfig, execute_evaluate,
    summary="compare attribution methods by degradation, bounding boxes and sensitivity-n",
    description="Compute each method's heatmaps on --images test images spread over the "
    "classes (see --select; cached in heatmaps_<method>.npz), then each metric (cached per method); writes results.csv, "
    "results.md, degradation.png (mean MoRF/LeRF curves) and examples.png (the first images "
    "with every method's heatmap and the object box), with sensitivity-n also "
    "sensitivity_n.png (correlation against n), and prints the table. The degradation "
    "column is the area between the mean LeRF and MoRF curves of the target-class probability "
    "(random ≈ 0); the paper's per-image normalised score is given beside it as mean and "
    "median (the mean is unstable when an image's clean and fully replaced scores are close). "
    "bbox needs "
    "data with boxes (shapes, ImageNet or folders with VOC XML box files); the default metrics "
    "skip it with a note on data without boxes. Adding methods or metrics on the same "
    "--out reuses what is done.",
    epilog="example:\n  narrows attribution evaluate --checkpoint best.pt --methods "
    "iba,saliency,gradcam,random --metrics degradation,bbox,sensitivity-n --images 50")
