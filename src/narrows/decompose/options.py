"""The options of the ``narrows decompose`` commands, as the library's own defaults.

Each dataclass holds one command's method options (not the model, data or output ones); the
command line builds its flags, ``--help`` and checks from these fields, so a Python caller
who leaves an option out gets the command's default. Torch-free, so ``--help`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from narrows.config import (
    Range,
    at_least,
    batch_size_option,
    distinct,
    fraction,
    non_negative,
    not_empty,
    option,
    positive,
    save_every_option,
    workers_option,
)

BASELINES = ("random", "top-weights")
CSG = "CSG comparison"
NOISE = "noise"


@dataclass
class ExtractOptions:
    """Options of ``decompose extract`` (:func:`~narrows.decompose.extract_subject`)."""

    k: int | None = option(None, "influential channels per class [default: 5, or 50 when the "
                           "head reads ≥ 1024 channels]", short="-k", check=positive)
    k_img: int | None = option(None, "channels counted per image (its top k_img positive "
                               "responses) [default: k]", check=positive)
    fraction: float | None = option(None, "variant A instead of k: a fraction in (0, 1); each "
                                    "class gets its own number of channels (two passes)",
                                    check=Range(0, 1, low_open=True, high_open=True))
    layer: str | None = option(None, "module whose output is pooled (e.g. layer3.2) [default: "
                               "the pooled input of the final linear layer]")
    split: Literal["train", "test"] = option("train", "split the histograms are counted on "
                                             "(no augmentation)")
    ks: list[int] | None = option(None, "further per-image k counted in the same pass, for "
                                  "'validate --extraction' curves [default: 1 2 3 4 5 8 10 16 "
                                  "20 ... up to D]", check=at_least(1).also(not_empty, distinct))
    thresholds: list[float] = option([0.5, 0.75, 0.9], "mass fractions t of the selectivity Ψ",
                                     check=Range(0, 1, low_open=True).also(not_empty))
    batch_size: int = batch_size_option()
    workers: int = workers_option()
    save_every: int = save_every_option(200)


@dataclass
class ValidateOptions:
    """Options of ``decompose validate`` (:func:`~narrows.decompose.validation_report`)."""

    indices: str | None = option(None, "indices JSON (upstream or narrows form): report the "
                                 "accuracy decomposed with them", metavar="FILE")
    extraction: str | None = option(None, "an 'extract' --out directory: its histograms give "
                                    "the 'histogram' curve", metavar="DIR")
    ks: list[int] | None = option(None, "k of the accuracy-vs-k curve [default: 1 2 3 4 5 8 "
                                  "10 16 20 ... up to D]",
                                  check=at_least(1).also(not_empty, distinct))
    baselines: list[Literal["random", "top-weights"]] = option(
        list(BASELINES), "baseline indices on the curve: random channels (from --seed) and "
                         "each class's top-|W| weights")
    curve: bool = option(True, "compute the accuracy-vs-k curve")
    batch_size: int = batch_size_option()
    workers: int = workers_option()


@dataclass
class FinetuneOptions:
    """Options of ``decompose finetune`` (:func:`~narrows.decompose.finetune_settings`)."""

    indices: str | None = option(None, "indices JSON (upstream or narrows form) to decompose "
                                 "with (required)", metavar="FILE")
    epochs: int = option(1, "fine-tuning epochs (upstream CIFAR: 1-3)", check=positive)
    lr: float = option(1e-4, "Adam learning rate, constant (upstream CIFAR 1e-4, ImageNet 1e-6)",
                       check=positive)
    batch_size: int = option(128, "images per step", check=positive)
    augment: Literal["auto", "none", "crop", "flip", "crop-flip", "resized-crop-flip"] = option(
        "auto", "augmentation; auto = the data set's standard one")
    workers: int = workers_option()
    eval_batch_size: int = batch_size_option(256, "images per evaluation batch")


@dataclass
class CSGCompareOptions:
    """The CSG network that ``essential`` and ``mutual-info`` compare with (optional)."""

    csg_checkpoint: str | None = option(
        None, "a CSG-trained network with its gate (the csg.pt of 'narrows decompose "
        "csg-train') to compare with", metavar="FILE",
        short="--csg-weights", group=CSG)
    csg_k: int = option(5, "channels per class taken from the CSG gate", check=positive,
                        group=CSG)
    csg_order: Literal["largest", "upstream", "both"] = option(
        "largest", "which gates name a class's channels: largest; upstream = the k smallest "
        "(a bug of the original code, only to reproduce its figures); both = one of each",
        group=CSG)


@dataclass
class EssentialOptions(CSGCompareOptions):
    """Options of ``decompose essential`` (:func:`~narrows.decompose.essential_comparison`)."""

    indices: str | None = option(None, "indices JSON of --checkpoint's model (upstream or "
                                 "narrows form)", metavar="FILE")
    k: int | None = option(None, "use the first k ids of each class [default: all in the file]",
                           check=positive)
    sigma: list[float] = option([0.5, 1.0, 2.0], "noise levels σ (upstream: 1); the upstream "
                                "JSON is written at σ = 1 when listed, else at the first",
                                check=non_negative.also(not_empty, distinct),
                                group=NOISE)
    mode: Literal["replace", "add"] = option(
        "replace", "replace the entries by σ·N(0,1) (upstream; σ = 0 zeroes them) or add it "
        "(σ = 0 changes nothing)", group=NOISE)
    split: Literal["test", "train"] = option("test", "split the images come from")
    images: int | None = option(None, "use the first N images of the split [default: all]",
                                check=positive)
    batch_size: int = batch_size_option(128)


@dataclass
class MutualInfoOptions(CSGCompareOptions):
    """Options of ``decompose mutual-info`` (:func:`~narrows.decompose.mutual_info_comparison`)."""

    indices: list[str] = option([], "indices JSON files ('ours'): each is used at its own k, "
                                "or truncated to a smaller --ks", metavar="FILE")
    ks: list[int] | None = option(None, "k values, one row each [default: the k of each "
                                  "--indices file, else 5 10 20]", check=at_least(1).also(not_empty))
    channels: int | None = option(None, "the feature width D the ids index into [default: "
                                  "from the model, or recorded in the file]", check=positive)
    random_draws: int = option(10, "random index sets per k averaged into the 'random' "
                               "column (0 = none)", check=non_negative)
    diagonal: bool = option(True, "plot the upstream score (diagonal pairs included); "
                            "--no-diagonal plots the corrected score (all scores are in the "
                            "tables either way)", affects_result=False)
    mis: bool = option(False, "also compute MIS (kNN MI of each channel with each class) of "
                       "the model(s) on test features; needs --checkpoint or --csg-checkpoint")
    images: int | None = option(None, "MIS: use the first N test images [default: all]",
                                check=positive)
    batch_size: int = batch_size_option(128, "MIS: images per forward pass")


@dataclass
class CSGTrainOptions:
    """The gate options of ``decompose csg-train`` (the CLI adds the training options)."""

    schedule: Literal["alternate", "joint"] = option(
        "alternate", "alternate: whole epochs alternate between the ordinary path (CE) and the "
        "CSG path (CE of the gated logits + sparsity), as the official code; joint: both "
        "terms every step (the paper's form)", group=CSG)
    period: int = option(2, "alternate: epochs per cycle", check=positive, group=CSG)
    csg_epochs: int = option(1, "alternate: CSG epochs at the end of each cycle",
                             check=positive, group=CSG)
    warmup: int = option(0, "alternate: ordinary epochs before the first cycle",
                         check=non_negative, group=CSG)
    lam_ce: float = option(1.0, "weight of the CSG path's cross-entropy", check=non_negative,
                           group=CSG)
    lam_l1: float = option(0.05, "weight of the sparsity hinge max(0, |G|_1 - density·C·D)",
                           check=non_negative, group=CSG)
    target_density: float = option(0.1, "gate density below which the hinge is 0 (official "
                                   "0.2)", check=fraction, group=CSG)
    clip: Literal["clamp", "official", "none"] = option(
        "clamp", "gate constraint after each step: clamp to [0, 1]; official = divide each "
        "channel's gates by their maximum over classes, then clamp; none", group=CSG)
    gate_init: float = option(0.5, "initial value of every gate (official 0.5)",
                              check=fraction, group=CSG)
    k: int = option(5, "channels per class written to indices_csg.json (largest gates)",
                    check=positive, group=CSG)
