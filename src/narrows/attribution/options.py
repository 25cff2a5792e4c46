"""The options of the ``narrows attribution`` commands, as dataclasses (torch-free).

The commands' configs are built from these classes, so their defaults are the library's
defaults: ``MethodSettings.from_options``, :func:`~narrows.attribution.statistics_for`,
:func:`~narrows.attribution.explain_images`, :func:`~narrows.attribution.evaluate_methods`,
:func:`~narrows.attribution.sanity_check` and ``train_readout_run`` accept them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from narrows.config import at_least, distinct, non_negative, not_empty, option, positive

READOUT = "readout options"
DEFAULT_METRICS = "degradation,bbox"


@dataclass
class LayerOption:
    """The bottleneck layer (listed after the subject in --help)."""

    layer: str | None = option(None, "IBA bottleneck layer [default: the stride-8 stage, e.g. "
                               "layer2 of a ResNet]")


@dataclass
class StatisticsOptions:
    """How IBA's feature statistics are estimated: ``n_samples`` images (None: 10,000 or
    the whole split), the noise ``kind`` and the ``batch_size`` of the forwards."""

    n_samples: int | None = option(None, "images for the feature statistics [default: 10,000, "
                                   "or all the split has; ≥ 1,000 advised]", check=positive)
    kind: Literal["welford", "relu_rms"] = option(
        "welford", "statistics: welford (mean and std, IBA package) or relu_rms (μ = 0, RMS of "
        "non-zero values, paper code for post-ReLU layers)")
    batch_size: int = option(64, "images per forward pass while estimating", check=positive,
                             affects_result=False)


@dataclass
class IBAOptions:
    """IBA's options (``beta``, ``steps``, ``iba_batch`` samples per step), a ``statistics``
    or ``readout`` file to use, and Grad-CAM's ``cam_layer``."""

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
    """How the images to explain are chosen: ``select`` spread (over the classes) or first."""

    select: Literal["spread", "first"] = option(
        "spread", "which test images: spread = round-robin over the classes, in an order drawn "
        "from --seed; first = the first N")


@dataclass
class StatsOptions:
    """The ``split`` that ``attribution stats`` estimates the statistics on."""

    split: Literal["train", "test"] = option("train", "split the images come from")


@dataclass
class ExplainOptions:
    """What ``attribution explain`` explains: the ``method``, how many ``images`` (or which
    ``indices``) and whether to write IBA's steps as a ``gif``."""

    method: str = option("iba", "iba or a baseline: " + "saliency, gradcam, random, ... "
                         "(see narrows.attribution.method_names())")
    images: int = option(8, "explain N test images (chosen by --select)", check=positive)
    indices: list[int] | None = option(None, "explain these test images instead of --images",
                                      check=non_negative.also(not_empty, distinct))
    gif: bool = option(False, "IBA only: also write an animated GIF of the optimisation steps "
                       "per image (iba_<index>.gif)", affects_result=False)


@dataclass
class EvaluateOptions:
    """What ``attribution evaluate`` compares: ``methods`` and ``metrics`` (comma-separated),
    the number of ``images``, the ``tile`` size, degradation's ``points``, sensitivity-n's
    ``n_sets`` and the ``eval_batch_size`` of the perturbed forwards."""

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


@dataclass
class SanityOptions:
    """What ``attribution sanity`` checks: ``methods``, the number of ``images``, the
    ``repeats`` on the unmodified model and the layers to ``randomise`` (None: all, top first)."""

    methods: str = option("iba,saliency,gradcam", "comma-separated methods; each one's result "
                          "is cached in sanity_<method>.pt", affects_result=False)
    images: int = option(16, "check on N test images (chosen by --select)", check=positive)
    repeats: int = option(2, "runs of each method on the unmodified model; their mutual "
                          "agreement is the run-to-run noise floor (needs ≥ 2)", check=positive)
    randomise: str | None = option(None, "comma-separated layers to re-initialise, top "
                                   "(output) first, cumulatively [default: the model's "
                                   "top-level children with parameters, last called first]",
                                   metavar="LAYERS")


@dataclass
class ReadoutTrainOptions:
    """What readout to train and how (the options of ``attribution readout-train``)."""

    layer: str | None = option(None, "readout bottleneck layer [default: layer1 of a ResNet; "
                               "conv3_1 (features.10) of a VGG]")
    readout_layers: list[str] | None = option(
        None, "layers whose feature maps feed the readout net (the logits are always added) "
        "[default: layer1..layer4 of a ResNet, layer1..layer3 of a CIFAR ResNet]",
        metavar="LAYER", group=READOUT)
    variant: Literal["A", "B"] = option(
        "B", "readout net width: B = 2·F_out hidden channels (IBA package), A = F_out/4 "
        "(paper's 'Readout Dense 10')", group=READOUT)
    epochs: int = option(10, "training epochs over the train split (spec: 10 on ImageNet)",
                         check=positive, group=READOUT)
    lr: float = option(1e-5, "Adam learning rate (IBA package, ImageNet: 1e-5). On the small "
                       "embedded data sets β = 10 makes a fast-training readout drop everything "
                       "(capacity → 0 at lr ≥ 1e-4 on shapes); --beta 1 --lr 1e-3 gave useful "
                       "maps there in 10 epochs", check=positive, group=READOUT)
    batch_size: int = option(32, "images per step", check=positive, group=READOUT)
    beta: float = option(10.0, "weight of the information loss (mean capacity in nats per "
                         "element); see --lr for small data sets", check=positive, group=READOUT)
    sigma: float = option(1.0, "σ of the Gaussian blur of λ (0 = none)", check=non_negative,
                          group=READOUT)
    train_images: int | None = option(None, "train on a fixed random subset of N train images "
                                      "[default: all]", check=positive, group=READOUT)
    augment: Literal["none", "auto", "crop", "flip", "crop-flip", "resized-crop-flip"] = option(
        "none", "augmentation of the training images; auto = the data set's standard one",
        group=READOUT)
    n_samples: int | None = option(None, "train images for the readout statistics [default: "
                                   "10,000, or all the split has; ≥ 1,000 advised]",
                                   check=positive, group=READOUT)
    kind: Literal["welford", "relu_rms"] = option(
        "welford", "noise statistics of the bottleneck layer: welford (mean and std) or "
        "relu_rms (paper code, post-ReLU layers)", group=READOUT)
    stats_batch_size: int = option(64, "images per forward pass while estimating statistics",
                                   check=positive, affects_result=False, group=READOUT)



def pick(options: Any, cls: type, **given: Any) -> dict[str, Any]:
    """For each keyword: its value if not None, else ``options``' value (when ``options`` has
    that field), else the default of ``cls``'s field of that name."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = {}
    for name, value in given.items():
        if value is None and options is not None and hasattr(options, name):
            value = getattr(options, name)
        if value is None:
            value = defaults.get(name)
        out[name] = value
    return out
