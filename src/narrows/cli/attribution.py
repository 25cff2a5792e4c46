"""``narrows attribution stats | explain | evaluate``: IBA heatmaps, baselines and metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.attribution_report import (
    EXAMPLES,
    draw_examples,
    draw_sensitivity,
    nanmean,
    write_results,
)
from narrows.cli.common import CommonOptions, SubjectOptions, load_subject, open_run, start
from narrows.config import option, positive

if TYPE_CHECKING:
    import numpy as np
    import torch

GROUPS["attribution"] = ("Information Bottleneck Attribution (IBA) heatmaps, Captum baselines "
                         "and their evaluation (degradation, bounding boxes, sensitivity-n)")
METRICS = ("degradation", "bbox", "sensitivity-n")


@dataclass
class LayerSubject(SubjectOptions):
    """Which model, on which data, at which layer (listed first in --help)."""

    layer: str | None = option(None, "IBA bottleneck layer [default: the stride-8 stage, e.g. "
                               "layer2 of a ResNet]")


@dataclass
class StatisticsOptions:
    n_samples: int = option(10_000, "images for the feature statistics (≥ 1,000 advised)",
                            check=positive)
    kind: Literal["welford", "relu_rms"] = option(
        "welford", "statistics: welford (mean and std, IBA package) or relu_rms (μ = 0, RMS of "
        "non-zero values, paper code for post-ReLU layers)")
    batch_size: int = option(64, "images per forward pass while estimating", check=positive,
                             affects_result=False)


@dataclass
class IBAOptions:
    beta: float = option(10.0, "IBA: weight of the information loss", check=positive)
    steps: int = option(10, "IBA: optimisation steps per image", check=positive)
    iba_batch: int = option(10, "IBA: noise samples per step", check=positive)
    statistics: str | None = option(None, "IBA: feature statistics file from 'attribution "
                                    "stats' [default: estimated into --out/statistics.pt from "
                                    "the train split]", metavar="FILE")
    readout: str | None = option(None, "method readout: the readout.pt written by 'attribution "
                                 "readout-train' (trained for the same checkpoint)",
                                 metavar="FILE")


@dataclass
class StatsConfig(StatisticsOptions, LayerSubject, CommonOptions):
    split: Literal["train", "test"] = option("train", "split the images come from")


@dataclass
class ExplainConfig(IBAOptions, StatisticsOptions, LayerSubject, CommonOptions):
    method: str = option("iba", "iba or a baseline: " + "saliency, gradcam, random, ... "
                         "(see narrows.attribution.available_methods)")
    images: int = option(8, "explain the first N test images", check=positive)
    indices: list[int] | None = option(None, "explain these test images instead of --images")
    gif: bool = option(False, "IBA only: also write an animated GIF of the optimisation steps "
                       "per image (iba_<index>.gif)", affects_result=False)


@dataclass
class EvaluateConfig(IBAOptions, StatisticsOptions, LayerSubject, CommonOptions):
    methods: str = option("iba,saliency,gradcam,random", "comma-separated methods; each one's "
                          "heatmaps are cached in heatmaps_<method>.npz", affects_result=False)
    metrics: str = option("degradation,bbox", "comma-separated: degradation, bbox (needs boxes), "
                          "sensitivity-n", affects_result=False)
    images: int = option(50, "evaluate on the first N test images", check=positive)
    tile: int = option(8, "tile side in pixels for degradation and sensitivity-n",
                       check=positive)
    points: int = option(100, "degradation: points per MoRF/LeRF curve", check=positive)
    n_sets: int = option(100, "sensitivity-n: random tile subsets per n", check=positive)
    eval_batch_size: int = option(128, "perturbed images per forward pass", check=positive,
                                  affects_result=False)


# -- shared ----------------------------------------------------------------------------------

def _subject(cfg: LayerSubject):
    """(model in eval mode, data bundle, normaliser, description, output stem)."""
    from narrows.training import Normalizer

    subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    return (subject.model.eval(), subject.bundle, Normalizer(subject.mean, subject.std),
            subject.name, subject.stem)


def _statistics(cfg, net, bundle, normalizer, session, path: Path, split: str = "train"):
    """Load ``cfg.statistics``, or ``path`` if it exists, or estimate and save into ``path``."""
    import torch

    from narrows.attribution import FeatureStatistics, default_layer, estimate_statistics

    if getattr(cfg, "statistics", None):
        return FeatureStatistics.load(cfg.statistics)
    if path.is_file():
        return FeatureStatistics.load(path)
    dataset = bundle.split(split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    layer = cfg.layer or default_layer(net)
    print(f"estimating feature statistics of '{layer}' on up to {cfg.n_samples:,} {split} "
          f"images ({len(dataset):,} available)")
    batches = (normalizer(x.to(session.device)) for x, _ in loader)
    stats = estimate_statistics(net.to(session.device), layer, batches, cfg.n_samples,
                                device=session.device, kind=cfg.kind)
    stats.save(path)
    return stats


def _split_names(text: str, what: str, allowed: list[str] | tuple[str, ...]) -> list[str]:
    from narrows.errors import UserError

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"no {what} given", f"choose from {', '.join(allowed)}")
    for name in names:
        if name not in allowed:
            raise UserError(f"unknown {what[:-1]} '{name}'", f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def _method_names() -> list[str]:
    from narrows.attribution.baselines import ALIASES, available_methods

    return ["iba", "readout", *available_methods(), *sorted(ALIASES)]


_READOUTS: dict[tuple[str, int, int], Any] = {}


def _readout_iba(path: str, net):
    """The :class:`ReadoutIBA` of the readout file ``path`` for ``net`` (loaded once)."""
    from narrows.attribution.readout import ReadoutIBA, load_readout

    file = Path(path)
    key = (str(file.resolve()), file.stat().st_mtime_ns if file.is_file() else 0, id(net))
    if key not in _READOUTS:
        _READOUTS.clear()
        _READOUTS[key] = ReadoutIBA(load_readout(path, net))
    return _READOUTS[key]


def _attribute(method: str, net, inputs: torch.Tensor, targets: torch.Tensor, cfg, stats,
               record_steps: bool = False):
    """An :class:`AttributionResult` of ``method`` for a batch of normalised ``inputs``."""
    from narrows.attribution import IBA, AttributionResult, make_method

    if method == "iba":
        iba = IBA(net, cfg.layer, stats, beta=cfg.beta, steps=cfg.steps,
                  batch_size=cfg.iba_batch, record_steps=record_steps)
        return iba.attribute(inputs, targets)
    if method == "readout":
        from narrows.errors import UserError

        readout = _readout_iba(cfg.readout, net)
        readout.readout.to(inputs.device)
        expected = readout.readout.input_shape
        if expected and tuple(inputs.shape[1:]) != expected:
            raise UserError(f"the images are {tuple(inputs.shape[1:])} but {cfg.readout} was "
                            f"trained on {expected}", "use the data the readout was trained on")
        return readout.attribute(inputs, targets)
    maps = make_method(method, net).attribute(inputs, targets)
    return AttributionResult(heatmaps=maps.cpu().numpy(), targets=targets.tolist(),
                             meta={"method": method})


def _batch(dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    items = [dataset[i] for i in indices]
    return (torch.stack([x for x, _ in items]),
            torch.tensor([int(y) for _, y in items], dtype=torch.long))


def _progress(items, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=None if progress else True, leave=False)


# -- stats -----------------------------------------------------------------------------------

def execute_stats(cfg: StatsConfig) -> int:
    from narrows.runs import default_out

    session = start(cfg)
    net, bundle, normalizer, name, stem = _subject(cfg)
    run = open_run(cfg, "attribution stats", default_out("attribution", "stats", stem),
                   session)
    path = run.file("statistics.pt")
    reused = path.is_file()
    stats = _statistics(cfg, net, bundle, normalizer, session, path, cfg.split)
    print(f"{'reused' if reused else 'estimated'} statistics of {name}: n={stats.n:,}, "
          f"layer={stats.layer}, feature shape={tuple(stats.shape or ())}, kind={stats.kind}")
    print(f"→ {path}")
    return 0


# -- explain ---------------------------------------------------------------------------------

def execute_explain(cfg: ExplainConfig) -> int:
    import numpy as np

    from narrows.attribution import AttributionResult
    from narrows.errors import UserError
    from narrows.plotting import pyplot
    from narrows.runs import default_out
    from narrows.runs.files import atomic_savefig, atomic_write

    if cfg.method not in _method_names():
        raise UserError(f"unknown attribution method '{cfg.method}'",
                        f"choose from {', '.join(_method_names())}")
    if cfg.gif and cfg.method != "iba":
        raise UserError("--gif shows IBA's optimisation steps", "use --method iba, or drop --gif")
    if cfg.method == "readout" and not cfg.readout:
        raise UserError("--method readout needs --readout FILE",
                        "train one with 'narrows attribution readout-train'")
    session = start(cfg)
    net, bundle, normalizer, name, stem = _subject(cfg)
    if cfg.method == "readout":
        _readout_iba(cfg.readout, net)  # a bad file fails before --out is written
    dataset = bundle.split("test")
    indices = list(cfg.indices) if cfg.indices else list(range(min(cfg.images, len(dataset))))
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise UserError(f"image index {bad[0]} is outside the {len(dataset)} test images",
                        f"give --indices between 0 and {len(dataset) - 1}")
    run = open_run(cfg, "attribution explain",
                   default_out("attribution", "explain", stem, cfg.method), session)
    net.to(session.device)
    stats = (_statistics(cfg, net, bundle, normalizer, session, run.file("statistics.pt"))
             if cfg.method == "iba" else None)
    todo = [i for i in indices if not (run.file(f"heatmap_{i}.png").is_file()
                                       and (run.file("items") / f"{i}" / "arrays.npz").is_file()
                                       and (not cfg.gif or run.file(f"iba_{i}.gif").is_file()))]
    per_image = f"{cfg.steps} steps × {cfg.iba_batch} noise samples" if cfg.method == "iba" \
        else "1 attribution"
    print(f"{name}: {cfg.method} on {len(indices)} test images ({len(indices) - len(todo)} "
          f"already done), {per_image} each"
          + (f" = {len(todo) * cfg.steps * cfg.iba_batch:,} suffix forwards to go"
             if cfg.method == "iba" else ""))
    plt = pyplot()
    for i in _progress(todo, cfg.progress, cfg.method):
        image, label = _batch(dataset, [i])
        result = _attribute(cfg.method, net, normalizer(image.to(session.device)),
                            label.to(session.device), cfg, stats, record_steps=cfg.gif)
        result.save(run.file("items") / f"{i}")
        fig, _ = result.plot(0, image[0])
        atomic_savefig(run.file(f"heatmap_{i}.png"), fig, dpi=120, bbox_inches="tight")
        plt.close(fig)
        if cfg.gif:
            write_gif(run.file(f"iba_{i}.gif"), result.step_heatmaps[0], image[0].numpy())
    results = [AttributionResult.load(run.file("items") / f"{i}") for i in indices]
    heatmaps = np.stack([r.heatmaps[0] for r in results])
    targets = [r.targets[0] if r.targets else -1 for r in results]
    atomic_write(run.file("heatmaps.npz"), lambda fh: np.savez_compressed(
        fh, heatmaps=heatmaps.astype(np.float32), indices=np.array(indices),
        targets=np.array(targets)))
    meta = {k: v for k, v in results[0].meta.items() if not k.startswith("seconds")}
    AttributionResult(heatmaps=heatmaps, targets=targets,
                      meta={**meta, "indices": indices}).save(run.file("result"))
    print(f"→ {run.file('heatmap_<index>.png')} ({len(indices)}), {run.file('heatmaps.npz')}"
          + (f", {run.file('iba_<index>.gif')}" if cfg.gif else ""))
    return 0


def write_gif(path: Path, steps: np.ndarray, image: np.ndarray, size: int = 160,
              ms_per_frame: int = 250) -> Path:
    """An animated GIF of per-step heatmaps (T, H, W) blended over a grey ``image`` (C, H, W)."""
    import numpy as np
    from PIL import Image

    from narrows.attribution.heatmap import _bits_colormap, _greyscale
    from narrows.runs.files import atomic_write

    grey = _greyscale(image)
    cmap = _bits_colormap()
    vmax = float(np.nanmax(steps)) if np.nanmax(steps) > 0 else 1.0
    frames = []
    for heat in steps:
        rgba = cmap(np.clip(np.nan_to_num(heat) / vmax, 0, 1))
        alpha = rgba[..., 3:] * 0.7
        rgb = rgba[..., :3] * alpha + grey[..., None] * (1 - alpha)
        frame = Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
        frames.append(frame.convert("P", palette=Image.ADAPTIVE))
    return atomic_write(path, lambda fh: frames[0].save(
        fh, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0))


# -- evaluate --------------------------------------------------------------------------------

def execute_evaluate(cfg: EvaluateConfig) -> int:
    import numpy as np

    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.runs.files import atomic_write

    methods = _split_names(cfg.methods, "methods", _method_names())
    metrics = _split_names(cfg.metrics, "metrics", METRICS)
    if "readout" in methods and not cfg.readout:
        raise UserError("--method readout needs --readout FILE",
                        "train one with 'narrows attribution readout-train'")
    session = start(cfg)
    net, bundle, normalizer, name, stem = _subject(cfg)
    if "readout" in methods:
        _readout_iba(cfg.readout, net)  # a bad file fails before --out is written
    if "bbox" in metrics and not bundle.info.has_boxes:
        raise UserError(f"{bundle.info.spec} has no bounding boxes for the bbox metric",
                        "drop bbox from --metrics, or use data with boxes (e.g. shapes)")
    dataset = bundle.split("test")
    indices = list(range(min(cfg.images, len(dataset))))
    run = open_run(cfg, "attribution evaluate",
                   default_out("attribution", "evaluate", stem), session)
    net.to(session.device)
    images, labels = _batch(dataset, indices)
    inputs = normalizer(images.to(session.device))
    labels = labels.to(session.device)
    stats = (_statistics(cfg, net, bundle, normalizer, session, run.file("statistics.pt"))
             if "iba" in methods else None)
    n, (h, w) = len(indices), images.shape[-2:]
    tiles = math.ceil(h / cfg.tile) * math.ceil(w / cfg.tile)
    forwards = {"degradation": n * 2 * cfg.points,
                "sensitivity-n": n * cfg.n_sets * min(16, tiles)}
    cost = sum(forwards.get(m, 0) for m in metrics) * len(methods)
    print(f"{name}: {len(methods)} methods × {n} images; IBA {cfg.steps} steps × "
          f"{cfg.iba_batch} samples per image; metrics {', '.join(metrics)} ≈ {cost:,} "
          "perturbed forwards")
    rows, curves, shown = [], {}, {}
    for method in methods:
        cache = run.file(f"heatmaps_{method}.npz")
        heatmaps = _cached(cache, indices)
        if heatmaps is None:
            maps = []
            for i in _progress(range(n), cfg.progress, method):
                result = _attribute(method, net, inputs[i : i + 1], labels[i : i + 1], cfg, stats)
                maps.append(result.heatmaps[0])
            heatmaps = np.stack(maps).astype(np.float32)
            atomic_write(cache, lambda fh, m=heatmaps: np.savez_compressed(
                fh, heatmaps=m, indices=np.array(indices)))
        row, curve = _metrics(run, method, metrics, net, inputs, labels, heatmaps, dataset,
                              indices, cfg)
        rows.append(row)
        shown[method] = heatmaps[:EXAMPLES]
        if curve:
            curves[method] = curve
    write_results(run, rows, curves, cfg.tile)
    draw_examples(run, shown, images[:EXAMPLES], dataset, indices[:EXAMPLES])
    if "sensitivity-n" in metrics:
        draw_sensitivity(run, methods)
    print(run.file("results.md").read_text())
    print(f"→ {run.file('results.csv')}, {run.file('results.md')}, {run.file('examples.png')}"
          + (f", {run.file('degradation.png')}" if curves else "")
          + (f", {run.file('sensitivity_n.png')}" if "sensitivity-n" in metrics else ""))
    return 0


def _cached(path: Path, indices: list[int]):
    import numpy as np

    if not path.is_file():
        return None
    with np.load(path) as data:
        if list(data["indices"]) != indices:
            return None
        return data["heatmaps"]


def _metrics(run, method, metrics, net, inputs, labels, heatmaps, dataset, indices, cfg):
    """One results row for ``method`` (each metric cached in metric_<method>_<metric>.json)."""
    import torch

    from narrows.attribution import bbox_ratio, degradation, sensitivity_n

    maps = torch.from_numpy(heatmaps)
    row: dict[str, Any] = {"method": method}
    curve = None
    for metric in metrics:
        file = f"metric_{method}_{metric}.json"
        if run.exists(file):
            values = run.read_json(file)
        elif metric == "degradation":
            r = degradation(net, inputs, maps.to(inputs.device), labels, tile=cfg.tile,
                            n_points=cfg.points, batch_size=cfg.eval_batch_size, seed=cfg.seed)
            morf, lerf = r.morf.mean(dim=0), r.lerf.mean(dim=0)
            values = {f"degradation_tile{cfg.tile}": r.raw_score,
                      "degradation_normalised": r.score,
                      "degradation_median": r.median_score,
                      "morf_area": float(morf.mean()), "lerf_area": float(lerf.mean()),
                      "curve": {"x": r.fractions.tolist(), "morf": morf.tolist(),
                                "lerf": lerf.tolist()}}
        elif metric == "bbox":
            r = bbox_ratio(maps, [dataset.boxes[i] for i in indices], seed=cfg.seed)
            values = {"bbox_ratio": r.mean, "bbox_images": r.n_used}
        else:
            r = sensitivity_n(net, inputs, maps.to(inputs.device), labels, tile=cfg.tile,
                              n_sets=cfg.n_sets, batch_size=cfg.eval_batch_size, seed=cfg.seed)
            values = {"sensitivity_n": nanmean(r.pooled),
                      "sensitivity_n_per_image": nanmean(r.per_image),
                      "sensitivity": {"n": list(r.ns), "pooled": r.pooled.tolist(),
                                      "per_image": r.per_image.tolist()}}
        run.write_json(file, values)
        curve = values.pop("curve", curve)
        values.pop("sensitivity", None)
        row.update(values)
    return row, curve


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
                                    points=50, n_samples=2000,
                                    **cfg.inherited(target / "evaluate")))
    execute_explain(ExplainConfig(checkpoint=checkpoint, images=4, gif=True,
                                  statistics=str(target / "evaluate" / "statistics.pt"),
                                  **cfg.inherited(target / "explain")))
    return (f"IBA vs {methods.split(',', 1)[1].replace(',', ', ')} on shapes "
            f"({QUICKSTART_IMAGES} images): {target / 'evaluate' / 'results.md'} and "
            f"examples.png; IBA heatmaps and GIFs: {target / 'explain'}")


register(Command(
    words=("attribution", "stats"),
    summary="estimate the feature statistics IBA needs at a layer",
    description="Run the model up to the bottleneck layer over training images and save the "
    "per-element mean and standard deviation (statistics.pt in --out; re-running reuses it).",
    config=StatsConfig,
    target="narrows.cli.attribution:execute_stats",
    epilog="example:\n  narrows attribution stats --checkpoint runs/train/resnet20_cifar-digits/"
    "best.pt --n-samples 10000",
))
register(Command(
    words=("attribution", "explain"),
    summary="draw IBA (or baseline) heatmaps of test images",
    description="Explain test images of the checkpoint's data with IBA (Schulz et al., ICLR "
    "2020) or a baseline, towards each image's label. Writes heatmap_<index>.png (overlay, bits "
    "per pixel), heatmaps.npz (all maps, indices, targets), result/ (the AttributionResult) and, "
    "with --gif, iba_<index>.gif of the optimisation steps. Finished images are skipped on a "
    "rerun. Without --statistics, IBA estimates them into --out/statistics.pt first.",
    config=ExplainConfig,
    target="narrows.cli.attribution:execute_explain",
    epilog="examples:\n  narrows attribution explain --checkpoint best.pt --images 8 --gif\n"
    "  narrows attribution explain --checkpoint best.pt --method gradcam --indices 3 14 15",
))
register(Command(
    words=("attribution", "evaluate"),
    summary="compare attribution methods by degradation, bounding boxes and sensitivity-n",
    description="Compute each method's heatmaps on the first --images test images (cached in "
    "heatmaps_<method>.npz), then each metric (cached per method); writes results.csv, "
    "results.md, degradation.png (mean MoRF/LeRF curves) and examples.png (the first images "
    "with every method's heatmap and the object box), with sensitivity-n also "
    "sensitivity_n.png (correlation against n), and prints the table. The degradation "
    "column is the area between the mean LeRF and MoRF curves of the target-class probability "
    "(random ≈ 0); the paper's per-image normalised score is given beside it as mean and "
    "median (the mean is unstable when an image's clean and fully replaced scores are close). "
    "bbox needs "
    "data with boxes (shapes, ImageNet with box files). Adding methods or metrics on the same "
    "--out reuses what is done.",
    config=EvaluateConfig,
    target="narrows.cli.attribution:execute_evaluate",
    epilog="example:\n  narrows attribution evaluate --checkpoint best.pt --methods "
    "iba,saliency,gradcam,random --metrics degradation,bbox,sensitivity-n --images 50",
))
