"""The options of the ``narrows interactions`` commands, as the library's own defaults.

:class:`EstimateOptions` is what every estimate takes (``interactions run`` and ``compare``;
:func:`narrows.interactions.measure.settings_from_preset` accepts it), :class:`OrderLossOptions`
the order loss of ``interactions train``. The command line builds its flags, ``--help`` and
checks from these fields. Torch-free, so ``--help`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from narrows.config import fraction, increasing, non_negative, not_empty, option, positive
from narrows.runs.session import SubjectOptions

ORDER = "order loss"
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
class OrderLossOptions:
    """The order loss of ``narrows interactions train``: a recipe or loss/r1/r2, and how the
    masked passes are made."""

    recipe: Literal["custom", "normal", "high", "mid", "low"] = option(
        "custom", "upstream recipe: normal = plain cross-entropy; high = penalize 0-0.5 "
        "(keeps high orders); mid = encourage 0.3-0.7; low = penalize 0.7-1 (keeps low "
        "orders); custom = give --loss, --r1 and --r2", group=ORDER)
    loss: Literal["encourage", "penalize"] | None = option(
        None, "encourage (cross-entropy of softmax Δu) or penalize (its negative entropy) the "
        "orders between r1·n and r2·n [default: from --recipe]", group=ORDER)
    r1: float | None = option(None, "smaller kept-player rate, 0 <= r1 < r2 (upstream "
                              "--preserve_rate2) [default: from --recipe]", check=fraction,
                              group=ORDER)
    r2: float | None = option(None, "larger kept-player rate, r2 <= 1 (upstream "
                              "--preserve_rate1) [default: from --recipe]", check=fraction,
                              group=ORDER)
    grid: int = option(8, "players grid: the image is cut into grid×grid patches; must divide "
                       "the image size (upstream 16 on CIFAR)", check=positive, group=ORDER)
    baseline: Literal["mean", "zero"] = option(
        "mean", "value of masked patches: mean = the data set's mean colour (upstream), zero = "
        "black", group=ORDER)
    lam_cls: float = option(1.0, "weight of the classification cross-entropy (upstream --lam1)",
                            check=non_negative, group=ORDER)
    lam_order: float = option(1.0, "weight of the order loss (upstream --lam2)",
                              check=non_negative, group=ORDER)
    bn_mode: Literal["freeze_stats", "eval_for_masked", "train"] = option(
        "freeze_stats", "BatchNorm in the two masked passes: freeze_stats = batch statistics "
        "as upstream, running statistics untouched; eval_for_masked = running statistics "
        "(can diverge when training from scratch); train = upstream (masked images enter the "
        "running statistics)", group=ORDER)
    n_draws: int = option(1, "mask draws per image and step, averaged (upstream 1)",
                          check=positive, group=ORDER)


@dataclass
class CurveSubject(SubjectOptions):
    """The model of ``narrows interactions run``, with its curve's label."""

    label: str | None = option(None, "name of this curve in plots [default: the model]",
                               affects_result=False)


@dataclass
class PlotOptions:
    """What ``narrows interactions plot`` overlays, and how
    (:func:`narrows.interactions.result.plot_runs`)."""

    runs: list[str] = option([], "directories of finished 'interactions run's", positional=True,
                             metavar="DIR")
    out: str = option("interactions.png", "figure file (.png, .pdf, .svg)", metavar="FILE")
    labels: list[str] | None = option(None, "one legend label per DIR [default: each run's label]")
    normalize: Literal["sampled", "uniform"] = option(
        "sampled", "J's normaliser: mean of A over the evaluated ratios (upstream) or the "
        "integral of A over r")
    debiased: bool = option(False, "plot the debiased estimate sqrt(max(0, I² − s²/K))")
    title: str | None = option(None, "figure title")


@dataclass
class CompareModels:
    """The models ``narrows interactions compare`` runs on the same images
    (:func:`narrows.interactions.measure.compare_models`)."""

    models: list[str] = option([], "LABEL=CHECKPOINT or LABEL=MODEL_NAME (random init) entries; "
                               "the images are chosen once, with the first model")
    data: str | None = option(None, "data spec [default: the first checkpoint's data]",
                              short="-d")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data",
                                    check=positive)
