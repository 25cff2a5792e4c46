"""The options of the ``narrows kvb`` commands, as the library's own defaults.

Each dataclass holds one command's method options (not the output or common ones); the command
line builds its flags, ``--help`` and checks from these fields, and
:class:`~narrows.kvb.continual.ContinualSettings` and :class:`~narrows.kvb.toy_run.ToySettings`
are built on them, so a Python caller who leaves an option out gets the command's default.
Torch-free, so ``--help`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from narrows.config import (
    batch_size_option,
    distinct,
    non_negative,
    not_empty,
    option,
    positive,
    save_every_option,
    seed_range,
    unit_open,
    workers_option,
)
from narrows.kvb.registry import MODEL_NAMES
from narrows.kvb.registry import TOY_MODEL_NAMES as TOY_MODELS
from narrows.kvb.store import DEFAULT_EMBEDDINGS

#: The toy's seeds when none are given (``narrows kvb toy``'s default).
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclass
class EmbedOptions:
    """The options of :func:`narrows.kvb.store.embed` as ``narrows kvb embed`` takes them."""

    checkpoint: str | None = option(None, "the frozen backbone's weights; a narrows checkpoint "
                                    "carries its architecture, normalisation and data (also "
                                    "accepted as --backbone, its former name)", metavar="FILE",
                                    short="--backbone")
    model: str | None = option(None, "architecture (timm name): of a checkpoint without a "
                               "narrows card, or without --checkpoint a backbone with random "
                               "initial weights from --seed (nothing is downloaded)", short="-m")
    data: str | None = option(None, "data spec [default: the checkpoint's data]", short="-d")
    split: list[Literal["train", "test"]] = option(["train", "test"], "splits to embed")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data",
                                    check=positive)
    resize: int | None = option(None, "resize images to N×N before the backbone (e.g. 224 for "
                                "ImageNet backbones on 32-px data)", check=positive)
    normalize: Literal["auto", "data", "imagenet"] = option(
        "auto", "input normalisation: auto = the checkpoint card's, else the data's")
    batch_size: int = batch_size_option()
    workers: int = workers_option()
    save_every: int = save_every_option(50, "a partial file")


@dataclass
class EmbeddingsOptions:
    """Where ``narrows kvb train`` reads the embeddings from."""

    embeddings: str = option(DEFAULT_EMBEDDINGS, "directory of 'narrows kvb embed' files",
                             metavar="DIR")


@dataclass
class ContinualOptions:
    """The options of :func:`narrows.kvb.continual.train_continual` (``narrows kvb train``)."""

    data: str | None = option(None, "the task's data spec (its train and test embeddings) "
                              "[default: the only data set with both splits in --embeddings]",
                              short="-d")
    backbone: str | None = option(None, "backbone id of the files (the part of the name before "
                                  "the data) [default: the only one in --embeddings]")
    key_data: str | None = option(None, "data spec whose unlabelled embeddings fit the keys "
                                  "[default: --data]")
    key_split: Literal["train", "test"] = option("train", "split of --key-data for the keys")
    protocol: list[Literal["incremental", "iid"]] = option(
        ["incremental", "iid"], "class-incremental stream and/or the i.i.d. control with the "
        "same sample visits", affects_result=False)
    model: list[Literal[MODEL_NAMES]] = \
        option(["dkvb", "linear", "mlp"], "models to run (each is stored on its own; adding one "
               "later reuses the run)", short="-m", affects_result=False)
    classes_per_task: int | None = option(None, "classes per task (upstream --split_size) "
                                          "[default: 2 when that makes at most 10 tasks, else "
                                          "the smallest divisor of the class count that does; "
                                          "1 for 2, 3 or a prime number of classes]",
                                          check=positive)
    class_order: list[int] | None = option(None, "the class order cut into tasks [default: "
                                           "shuffled by --seed]",
                                           check=non_negative.also(not_empty, distinct))
    epochs: int | None = option(None, "epochs per task (upstream --cl_epochs: 2000); the "
                                "i.i.d. control runs as many over all classes [default: about "
                                "1000 steps per task, at most 2000 epochs]", check=positive)
    batch_size: int = option(256, "training batch size (all models)", check=positive)
    num_books: int = option(256, "DKVB heads / codebooks C", check=positive)
    num_pairs: int | None = option(None, "DKVB key-value pairs per codebook J [default: half "
                                   "the key embeddings as a power of two, 16 to 4096]",
                                   check=positive)
    dim_key: int | None = option(None, "DKVB key dimension k [default: 14, at most the "
                                 "embedding's dimension]", check=positive)
    topk: int = option(1, "DKVB pairs fetched per head", check=positive)
    splitting_mode: Literal["random_projection", "chunk"] = option(
        "random_projection", "how the embedding is cut into heads")
    decay: float = option(0.95, "EMA decay of the key initialisation", check=unit_open)
    threshold_factor: float = option(0.1, "dead-code threshold factor of the key "
                                     "initialisation", check=non_negative)
    init_epochs: int | None = option(None, "key-initialisation epochs [default: 10, more when "
                                     "that is under 50 EMA steps]", check=positive)
    lr: float = option(0.3, "DKVB value learning rate (plain SGD)", check=positive)
    label_smoothing: float = option(0.1, "label smoothing (all models)", check=unit_open)
    gradient_clip: float = option(1.0, "gradient-norm clip (all models; 0 = off)",
                                  check=non_negative)
    prune: bool = option(True, "DKVB evaluation leaves never-fetched pairs out")
    probe_optimizer: Literal["sgd", "adam"] = option("sgd", "optimiser of the baselines")
    probe_lr: float = option(1e-3, "learning rate of the baselines", check=positive)
    hidden: int = option(128, "hidden units of the MLP baselines", check=positive)
    ridge_decay: float = option(1e-4, "weight decay of the ridge baselines (upstream 1e-2, "
                                "1e-4, 1e-6)", check=positive)
    vq_decoder: Literal["mlp", "linear"] = option("mlp", "the VQ baseline's trainable decoder")


@dataclass
class ToyOptions:
    """The options of :func:`narrows.kvb.toy_run.run_toy` (``narrows kvb toy``)."""

    seeds: list[int] = option(list(DEFAULT_SEEDS), "seeds, each a full repetition (data, keys, "
                              "initialisation)", check=seed_range.also(not_empty, distinct))
    models: list[Literal[TOY_MODELS]] = option(list(TOY_MODELS), "models to train")
    steps: int = option(1000, "full-batch steps per stage", check=positive)
    train_points: int = option(100, "training points per stage (class of each by a fair coin)",
                               check=positive)
    test_points: int = option(1000, "test points per stage", check=positive)
    key_batches: int = option(1000, "batches of 100 uniform points the keys are fitted on",
                              check=positive)
    decay: float = option(0.95, "EMA decay of the key fitting", check=unit_open)
    kv_lr: float | None = option(None, "learning rate of the KV values [default: 1e-3, the "
                                 "authors']", check=positive)
    resolution: int = option(100, "decision-map points per axis", check=positive)

