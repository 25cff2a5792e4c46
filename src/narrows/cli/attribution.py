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
from narrows.cli.common import CommonOptions, SubjectOptions, open_run, start
from narrows.config import at_least, distinct, non_negative, not_empty, option, positive
from narrows.notes import note_once

if TYPE_CHECKING:
    import numpy as np
    import torch

GROUPS["attribution"] = ("Information Bottleneck Attribution (IBA) heatmaps, Captum baselines "
                         "and their evaluation (degradation, bounding boxes, sensitivity-n)")
METRICS = ("degradation", "bbox", "sensitivity-n")
DEFAULT_METRICS = "degradation,bbox"
DEFAULT_N_SAMPLES = 10_000


@dataclass
class LayerSubject(SubjectOptions):
    """Which model, on which data, at which layer (listed first in --help)."""

    layer: str | None = option(None, "IBA bottleneck layer [default: the stride-8 stage, e.g. "
                               "layer2 of a ResNet]")


@dataclass
class StatisticsOptions:
    n_samples: int | None = option(None, "images for the feature statistics [default: 10,000, "
                                   "or all the split has; ≥ 1,000 advised]", check=positive)
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
    cam_layer: str | None = option(None, "Grad-CAM and Guided Grad-CAM: the layer whose "
                                   "activations are weighted [default: the last stage, e.g. "
                                   "layer4 of a ResNet]", metavar="LAYER")


@dataclass
class ImageChoice:
    select: Literal["spread", "first"] = option(
        "spread", "which test images: spread = round-robin over the classes, in an order drawn "
        "from --seed; first = the first N")


@dataclass
class StatsConfig(StatisticsOptions, LayerSubject, CommonOptions):
    split: Literal["train", "test"] = option("train", "split the images come from")


@dataclass
class ExplainConfig(ImageChoice, IBAOptions, StatisticsOptions, LayerSubject, CommonOptions):
    method: str = option("iba", "iba or a baseline: " + "saliency, gradcam, random, ... "
                         "(see narrows.attribution.available_methods)")
    images: int = option(8, "explain N test images (chosen by --select)", check=positive)
    indices: list[int] | None = option(None, "explain these test images instead of --images",
                                      check=non_negative.also(not_empty, distinct))
    gif: bool = option(False, "IBA only: also write an animated GIF of the optimisation steps "
                       "per image (iba_<index>.gif)", affects_result=False)


@dataclass
class EvaluateConfig(ImageChoice, IBAOptions, StatisticsOptions, LayerSubject, CommonOptions):
    methods: str = option("iba,saliency,gradcam,random", "comma-separated methods; each one's "
                          "heatmaps are cached in heatmaps_<method>.npz", affects_result=False)
    metrics: str | None = option(None, "comma-separated: degradation, bbox (needs boxes), "
                                 "sensitivity-n [default: degradation,bbox; bbox is skipped "
                                 "with a note on data without boxes]", affects_result=False)
    images: int = option(50, "evaluate on N test images (chosen by --select)", check=positive)
    tile: int = option(8, "tile side in pixels for degradation and sensitivity-n",
                       check=positive)
    points: int = option(100, "degradation: points per MoRF/LeRF curve", check=at_least(2))
    n_sets: int = option(100, "sensitivity-n: random tile subsets per n", check=positive)
    eval_batch_size: int = option(128, "perturbed images per forward pass", check=positive,
                                  affects_result=False)


# -- shared ----------------------------------------------------------------------------------

def _subject(cfg: LayerSubject):
    """(model in eval mode, data bundle, normaliser, description, output stem)."""
    from narrows.models.subject import load_subject
    from narrows.training import Normalizer

    subject = load_subject(cfg.checkpoint, cfg.model, cfg.data, cfg.image_size)
    return (subject.model.eval(), subject.bundle, Normalizer(subject.mean, subject.std),
            subject.name, subject.stem)


def n_samples(cfg) -> int:
    """The number of images for feature statistics: ``--n-samples`` or the default."""
    return cfg.n_samples if cfg.n_samples is not None else DEFAULT_N_SAMPLES


def few_samples_note(cfg, n: int, split: str, what: str = "IBA's feature statistics") -> None:
    """One note when the default sample count found fewer than 1,000 images (a small split);
    an explicit ``--n-samples`` is the user's choice and gets none."""
    from narrows.attribution.statistics import MIN_SAMPLES, few_samples

    if cfg.n_samples is None and few_samples(n):
        note_once("few-samples", f"{what} use all {n:,} {split} images (≥ {MIN_SAMPLES:,} "
                  "advised): fine to try on a small data set, the noise model is just rougher; "
                  "--n-samples N sets the count and silences this note")


def _statistics(cfg, net, bundle, normalizer, session, path: Path, split: str = "train",
                re_estimate: bool = False):
    """Load ``cfg.statistics``, or ``path`` if it exists, or estimate and save into ``path``.

    A ``path`` estimated on other weights is refused, or (``re_estimate``, for models that are
    drawn anew on every run) estimated again."""
    import torch

    from narrows.attribution import FeatureStatistics, default_layer, estimate_statistics

    if getattr(cfg, "statistics", None):
        return FeatureStatistics.load(cfg.statistics)
    if path.is_file():
        cached = FeatureStatistics.load(path)
        from narrows.models.checkpoints import model_fingerprint

        if not re_estimate or cached.model_fingerprint in ("", model_fingerprint(net)):
            cached.check_model(net, str(path), "the model changed since this run: rerun with "
                               "--overwrite, or pass another --out")
            return cached
    dataset = bundle.split(split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    layer = cfg.layer or default_layer(net)
    count = min(n_samples(cfg), len(dataset))
    print(f"estimating feature statistics of '{layer}' on {count:,} {split} images "
          f"({len(dataset):,} available)")
    batches = (normalizer(x.to(session.device)) for x, _ in loader)
    stats = estimate_statistics(net.to(session.device), layer, batches, n_samples(cfg),
                                device=session.device, kind=cfg.kind, warn=False)
    few_samples_note(cfg, stats.n, split)
    stats.save(path)
    return stats


def check_methods(methods: list[str], net, cfg, probe: torch.Tensor | None = None) -> None:
    """Fail now, before any work, on what would fail later: a baseline that needs a missing
    extra or has no default layer on this model, a bad IBA layer, a statistics file of
    another layer or (given a normalised ``probe`` image batch) of another feature shape."""
    from narrows.attribution import FeatureStatistics, default_layer, get_layer, make_method
    from narrows.attribution.baselines import ALIASES, available_methods, uses_layer
    from narrows.errors import UserError

    if cfg.layer and not {"iba", "readout"} & set(methods) and hasattr(cfg, "cam_layer"):
        fix = (f"pass --cam-layer {cfg.layer} to set Grad-CAM's layer"
               if any(uses_layer(m) for m in methods) else "leave --layer out")
        raise UserError(f"--layer sets IBA's bottleneck, and {', '.join(methods)} "
                        f"{'does' if len(methods) == 1 else 'do'} not use it", fix)
    if getattr(cfg, "cam_layer", None) and not any(uses_layer(m) for m in methods):
        raise UserError("--cam-layer sets the layer of gradcam and guided_gradcam, which are "
                        f"not among the methods ({', '.join(methods)})", "leave --cam-layer out")
    baselines = {*available_methods(), *ALIASES}
    for method in methods:
        if method in baselines:
            built = make_method(method, net, layer=getattr(cfg, "cam_layer", None))
            if uses_layer(method):
                get_layer(net, built.layer_name())  # a wrong name is one line, before any work
        elif method == "iba":
            layer = cfg.layer or default_layer(net)
            get_layer(net, layer)
            if getattr(cfg, "statistics", None):
                stats = FeatureStatistics.load(cfg.statistics)
                stats.check_model(net, cfg.statistics)
                if stats.layer and stats.layer != layer:
                    raise UserError(f"{cfg.statistics} holds statistics of layer '{stats.layer}',"
                                    f" not '{layer}'", f"pass --layer {stats.layer}, or estimate "
                                    "statistics of this layer with 'narrows attribution stats'")
                if probe is not None:
                    import torch

                    from narrows.attribution import run_to_layer

                    with torch.no_grad():
                        shape = tuple(run_to_layer(net.eval(), layer, probe).shape[1:])
                    if stats.shape and tuple(stats.shape) != shape:
                        raise UserError(f"{cfg.statistics} holds features shaped "
                                        f"{tuple(stats.shape)}, but '{layer}' gives {shape} on "
                                        f"these {tuple(probe.shape[-2:])} images",
                                        "estimate statistics at this image size with 'narrows "
                                        "attribution stats'")
        elif method == "readout":
            if not cfg.readout:
                raise UserError("--method readout needs --readout FILE",
                                "train one with 'narrows attribution readout-train'")
            _readout_iba(cfg.readout, net)


def pick_indices(cfg, dataset) -> list[int]:
    """``--indices`` if given, else ``--images`` test images chosen by ``--select``."""
    from narrows.data import select_images
    from narrows.errors import UserError

    indices = list(getattr(cfg, "indices", None) or [])
    if not indices:
        return select_images(dataset, cfg.images, seed=cfg.seed, how=cfg.select)
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise UserError(f"image index {bad[0]} is outside the {len(dataset)} test images",
                        f"give --indices between 0 and {len(dataset) - 1}")
    return indices


def describe_images(indices: list[int], labels: list[int], class_names) -> str:
    """``"3 images: 2 circle, 1 square"``: how many images of each class were chosen."""
    from collections import Counter

    from narrows.attribution.heatmap import target_name

    counts = Counter(labels)
    parts = [f"{counts[c]} {target_name(c, class_names)}" for c in sorted(counts)]
    shown = ", ".join(parts[:8]) + (f", … ({len(parts)} classes)" if len(parts) > 8 else "")
    return f"{len(indices)} test images ({shown})"


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
               record_steps: bool = False, ids: list[int] | None = None):
    """An :class:`AttributionResult` of ``method`` for a batch of normalised ``inputs``.

    ``ids`` (the images' dataset indices) key each image's random draws on ``(cfg.seed, id)``,
    so a heatmap does not depend on the images explained before it (IBA's noise; the seed of
    random and SmoothGrad, given one image at a time). Without ``ids`` the global RNG is used.
    """
    from narrows.attribution import IBA, AttributionResult, make_method
    from narrows.attribution.baselines import ALIASES, BASELINES
    from narrows.runtime import derive_seed

    if method == "iba":
        iba = IBA(net, cfg.layer, stats, beta=cfg.beta, steps=cfg.steps,
                  batch_size=cfg.iba_batch, record_steps=record_steps,
                  seed=None if ids is None else cfg.seed)
        return iba.attribute(inputs, targets, ids=ids)
    if method == "readout":
        from narrows.errors import UserError

        readout = _readout_iba(cfg.readout, net)
        readout.readout.to(inputs.device)
        expected = readout.readout.input_shape
        if expected and tuple(inputs.shape[1:]) != expected:
            raise UserError(f"the images are {tuple(inputs.shape[1:])} but {cfg.readout} was "
                            f"trained on {expected}", "use the data the readout was trained on")
        return readout.attribute(inputs, targets)
    options = {}
    if ids is not None and len(ids) == 1 and "seed" in BASELINES[ALIASES.get(method, method)].defaults:
        options["seed"] = derive_seed(cfg.seed, ids[0])
    baseline = make_method(method, net, layer=cfg.cam_layer, **options)
    maps = baseline.attribute(inputs, targets)
    return AttributionResult(heatmaps=maps.cpu().numpy(), targets=targets.tolist(),
                             meta=baseline.describe())


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
    from narrows.attribution.heatmap import target_name
    from narrows.data import dataset_labels
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
    dataset = bundle.split("test")
    indices = pick_indices(cfg, dataset)
    probe = normalizer(_batch(dataset, indices[:1])[0])
    check_methods([cfg.method], net, cfg, probe)  # what can fail, before --out is written
    class_names = bundle.info.class_names
    all_labels = dataset_labels(dataset)
    labels = [all_labels[i] for i in indices]
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
    print(f"{name}: {cfg.method} on {describe_images(indices, labels, class_names)}; "
          f"{len(indices) - len(todo)} already done, {per_image} each"
          + (f" = {len(todo) * cfg.steps * cfg.iba_batch:,} suffix forwards to go"
             if cfg.method == "iba" else ""))
    plt = pyplot()
    for i in _progress(todo, cfg.progress, cfg.method):
        image, label = _batch(dataset, [i])
        result = _attribute(cfg.method, net, normalizer(image.to(session.device)),
                            label.to(session.device), cfg, stats, record_steps=cfg.gif,
                            ids=[i])
        result.meta = {**result.meta, "model": name, "data": bundle.info.spec, "index": i}
        result.save(run.file("items") / f"{i}")
        fig, _ = result.plot(0, image[0], class_names=class_names,
                             subject=f"{name} · test image {i}")
        atomic_savefig(run.file(f"heatmap_{i}.png"), fig, dpi=120, bbox_inches="tight")
        plt.close(fig)
        if cfg.gif:
            write_gif(run.file(f"iba_{i}.gif"), result.step_heatmaps[0], image[0].numpy())
    results = [AttributionResult.load(run.file("items") / f"{i}") for i in indices]
    heatmaps = np.stack([r.heatmaps[0] for r in results])
    targets = [r.targets[0] if r.targets else -1 for r in results]
    names = [target_name(t, class_names) if t >= 0 else "" for t in targets]
    atomic_write(run.file("heatmaps.npz"), lambda fh: np.savez_compressed(
        fh, heatmaps=heatmaps.astype(np.float32), indices=np.array(indices),
        targets=np.array(targets), target_names=np.array(names)))
    meta = {k: v for k, v in results[0].meta.items()
            if not k.startswith("seconds") and k != "index"}
    AttributionResult(heatmaps=heatmaps, targets=targets,
                      meta={**meta, "indices": indices, "target_names": names,
                            "class_names": list(class_names)}).save(run.file("result"))
    print(f"→ {run.file('heatmap_<index>.png')} ({len(indices)}), {run.file('heatmaps.npz')}"
          + (f", {run.file('iba_<index>.gif')}" if cfg.gif else ""))
    return 0


def write_gif(path: Path, steps: np.ndarray, image: np.ndarray, size: int = 160,
              ms_per_frame: int = 250) -> Path:
    """An animated GIF of per-step heatmaps (T, H, W) blended over a grey ``image`` (C, H, W).

    Every frame uses one colour scale and one palette, so colours mean the same in every frame:
    0 to the peak of the final map in bits per pixel (the early steps, before the bottleneck
    has closed, exceed it and saturate; a scale set by them would draw the result blank). A
    strip under each frame gives the step and that scale.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from narrows.attribution.heatmap import _bits_colormap, _greyscale
    from narrows.runs.files import atomic_write

    grey = _greyscale(image)
    cmap = _bits_colormap()
    steps = np.nan_to_num(np.asarray(steps, dtype=np.float64))
    final = float(steps[-1].max()) if steps.size else 0.0
    peak = final if final > 0 else (float(steps.max()) if steps.size else 0.0)
    vmax = peak if peak > 0 else 1.0
    strip = 36
    bar = cmap(np.linspace(0, 1, size - 16))[None, :, :3].repeat(6, axis=0)
    rgb_frames = []
    for step, heat in enumerate(steps, 1):
        rgba = cmap(np.clip(heat / vmax, 0, 1))
        alpha = rgba[..., 3:] * 0.7
        rgb = rgba[..., :3] * alpha + grey[..., None] * (1 - alpha)
        heat_img = Image.fromarray((rgb * 255).astype(np.uint8)).resize((size, size),
                                                                        Image.NEAREST)
        frame = Image.new("RGB", (size, size + strip), "white")
        frame.paste(heat_img, (0, 0))
        frame.paste(Image.fromarray((bar * 255).astype(np.uint8)), (8, size + 2))
        draw = ImageDraw.Draw(frame)
        scale = f"0 to {peak:.3g} bits/px" if peak > 0 else "all-zero map"
        draw.text((8, size + 10), f"step {step}/{len(steps)}", fill="black")
        draw.text((8, size + 22), scale, fill="black")
        rgb_frames.append(frame)
    # one adaptive palette for all frames (a palette per frame would shift the colours)
    sheet = Image.new("RGB", (size, (size + strip) * len(rgb_frames)))
    for k, frame in enumerate(rgb_frames):
        sheet.paste(frame, (0, k * (size + strip)))
    palette = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    frames = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in rgb_frames]
    return atomic_write(path, lambda fh: frames[0].save(
        fh, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0))


# -- evaluate --------------------------------------------------------------------------------

def resolve_metrics(cfg: EvaluateConfig, dataset, spec: str) -> list[str]:
    """The metrics to compute. Without boxes, the default list drops bbox with a note and an
    explicit ``--metrics bbox`` is a :class:`UserError`."""
    from narrows.data import dataset_has_boxes
    from narrows.errors import UserError

    metrics = _split_names(cfg.metrics or DEFAULT_METRICS, "metrics", METRICS)
    if "bbox" in metrics and not dataset_has_boxes(dataset):
        if cfg.metrics is not None:
            raise UserError(f"{spec} has no bounding boxes for the bbox metric",
                            "drop bbox from --metrics, or use data with boxes (shapes, or "
                            "imagenet:/folder: with VOC XML box files beside the images)")
        metrics.remove("bbox")
        note_once("no-boxes", f"{spec} has no object boxes, so the bbox metric is skipped "
                  "(boxes: shapes, or VOC XML files beside imagenet:/folder: images)")
    return metrics


def execute_evaluate(cfg: EvaluateConfig) -> int:
    import numpy as np

    from narrows.data import dataset_labels
    from narrows.errors import UserError
    from narrows.runs import default_out
    from narrows.runs.files import atomic_write

    methods = _split_names(cfg.methods, "methods", _method_names())
    _split_names(cfg.metrics or DEFAULT_METRICS, "metrics", METRICS)
    if "readout" in methods and not cfg.readout:
        raise UserError("--method readout needs --readout FILE",
                        "train one with 'narrows attribution readout-train'")
    session = start(cfg)
    net, bundle, normalizer, name, stem = _subject(cfg)
    dataset = bundle.split("test")
    metrics = resolve_metrics(cfg, dataset, bundle.info.spec)
    indices = pick_indices(cfg, dataset)
    probe = normalizer(_batch(dataset, indices[:1])[0])
    check_methods(methods, net, cfg, probe)  # what can fail, before --out is written
    h, w = probe.shape[-2:]
    if {"degradation", "sensitivity-n"} & set(metrics) and math.ceil(h / cfg.tile) * math.ceil(
            w / cfg.tile) < 2:
        raise UserError(f"--tile {cfg.tile} leaves one tile of the {h}×{w} images, and "
                        "degradation and sensitivity-n remove tiles one by one",
                        f"pass --tile of at most {math.ceil(max(h, w) / 2)}")
    all_labels = dataset_labels(dataset)
    class_names = bundle.info.class_names
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
    print(f"{name}: {len(methods)} methods × "
          f"{describe_images(indices, [all_labels[i] for i in indices], class_names)}; "
          + (f"IBA {cfg.steps} steps × {cfg.iba_batch} samples per image; "
             if "iba" in methods else "")
          + "metrics "
          f"{', '.join(metrics) or 'none'} ≈ {cost:,} perturbed forwards")
    rows, curves, shown = [], {}, {}
    for method in methods:
        cache = run.file(f"heatmaps_{method}.npz")
        heatmaps = _cached(cache, indices)
        if heatmaps is None:
            maps = []
            for i in _progress(range(n), cfg.progress, method):
                result = _attribute(method, net, inputs[i : i + 1], labels[i : i + 1], cfg, stats,
                                    ids=[indices[i]])
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
    subject = f"{name}, {n} images"
    write_results(run, rows, curves, cfg.tile, subject=subject)
    draw_examples(run, shown, images[:EXAMPLES], dataset, indices[:EXAMPLES],
                  class_names=class_names, subject=f"{name} · {min(EXAMPLES, n)} of {n} images")
    if "sensitivity-n" in metrics:
        draw_sensitivity(run, methods, subject=subject)
    print(run.file("results.md").read_text())
    print(f"→ {run.file('results.csv')}, {run.file('results.md')}, {run.file('examples.png')}"
          + (f", {run.file('degradation.png')}" if curves else "")
          + (f", {run.file('sensitivity_n.png')}" if "sensitivity-n" in metrics else ""))
    return 0


def _cached(path: Path, indices: list[int]):
    if not path.is_file():
        return None
    from narrows.runs.files import read_npz, reading

    data = read_npz(path, "cached heatmaps file", required=("indices", "heatmaps"))
    with reading(path, "cached heatmaps file"):
        if list(data["indices"]) != indices:
            return None
        if data["heatmaps"].ndim < 3 or len(data["heatmaps"]) != len(indices):
            raise ValueError(f"heatmaps of shape {data['heatmaps'].shape} for {len(indices)} images")
        return data["heatmaps"]


def _metrics(run, method, metrics, net, inputs, labels, heatmaps, dataset, indices, cfg):
    """One results row for ``method`` (each metric cached in metric_<method>_<metric>.json)."""
    import torch

    from narrows.attribution import bbox_ratio, degradation, sensitivity_n
    from narrows.data import dataset_boxes

    maps = torch.from_numpy(heatmaps)
    row: dict[str, Any] = {"method": method}
    curve = None
    for metric in metrics:
        file = f"metric_{method}_{metric}.json"
        cached = run.exists(file)
        if cached:
            values = run.read_json(file, kind=dict)
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
            r = bbox_ratio(maps, [dataset_boxes(dataset, i) for i in indices], seed=cfg.seed)
            values = {"bbox_ratio": r.mean, "bbox_images": r.n_used}
        else:
            r = sensitivity_n(net, inputs, maps.to(inputs.device), labels, tile=cfg.tile,
                              n_sets=cfg.n_sets, batch_size=cfg.eval_batch_size, seed=cfg.seed)
            values = {"sensitivity_n": nanmean(r.pooled),
                      "sensitivity_n_per_image": nanmean(r.per_image),
                      "sensitivity": {"n": list(r.ns), "pooled": r.pooled.tolist(),
                                      "per_image": r.per_image.tolist()}}
        if not cached:
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
    description="Explain test images of the checkpoint's data (spread over the classes, see "
    "--select) with IBA (Schulz et al., ICLR 2020) or a baseline, towards each image's label. "
    "Writes heatmap_<index>.png (overlay: IBA in bits per pixel, signed methods on a diverging "
    "scale centred at 0), heatmaps.npz (all maps, indices, targets and their class names), "
    "result/ (the AttributionResult, with the method's units and parameters) and, "
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
    config=EvaluateConfig,
    target="narrows.cli.attribution:execute_evaluate",
    epilog="example:\n  narrows attribution evaluate --checkpoint best.pt --methods "
    "iba,saliency,gradcam,random --metrics degradation,bbox,sensitivity-n --images 50",
))
