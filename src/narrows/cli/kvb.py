"""``narrows kvb embed | train``: frozen-backbone embeddings and the class-incremental protocols."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from narrows.cli.app import GROUPS, Command, register
from narrows.cli.common import CommonOptions, open_run, replace, start
from narrows.config import (
    distinct,
    flag_name,
    non_negative,
    not_empty,
    option,
    positive,
    unit_open,
)
from narrows.kvb.registry import MODEL_NAMES
from narrows.kvb.store import DEFAULT_EMBEDDINGS

GROUPS["kvb"] = ("discrete key-value bottleneck: frozen-backbone embeddings, class-incremental "
                 "protocols against linear/MLP/ridge/VQ baselines, the 2-D toy, sweeps")


@dataclass
class EmbedConfig(CommonOptions):
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
    batch_size: int = option(256, "images per forward pass", check=positive,
                             affects_result=False)
    workers: int = option(0, "data-loading worker processes", check=non_negative,
                          affects_result=False)
    save_every: int = option(50, "save a partial file every N batches (a killed run resumes "
                             "there)", check=positive, affects_result=False)


@dataclass
class TrainConfig(CommonOptions):
    embeddings: str = option(DEFAULT_EMBEDDINGS, "directory of 'narrows kvb embed' files",
                             metavar="DIR")
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


# -- embed --------------------------------------------------------------------------------------
def execute_embed(cfg: EmbedConfig) -> int:
    from narrows.kvb.store import embed

    session = start(cfg)
    with flag_errors():
        embed(cfg.checkpoint, model=cfg.model, data=cfg.data, splits=cfg.split,
              out=cfg.out or DEFAULT_EMBEDDINGS, image_size=cfg.image_size, resize=cfg.resize,
              normalize=cfg.normalize, batch_size=cfg.batch_size, workers=cfg.workers,
              save_every=cfg.save_every, overwrite=cfg.overwrite, seed=cfg.seed,
              device=session.device, progress=cfg.progress,
              say=lambda text: session.say(as_flags(text)))
    session.close()
    return 0


# -- train --------------------------------------------------------------------------------------
def execute_train(cfg: TrainConfig) -> int:
    from narrows.kvb.continual import ContinualSettings, train_continual
    from narrows.kvb.embeddings import data_key
    from narrows.runs import default_out

    session = start(cfg)
    opened: list[Any] = []

    def say(text: str) -> None:
        session.say(as_flags(text))

    def open_(settings: ContinualSettings, task: Any) -> Any:
        resolved = replace(cfg, **dataclasses.asdict(settings))  # recorded in config.yaml
        out = default_out("kvb-train", task.backbone, data_key(settings.data))
        opened.append(open_run(resolved, "kvb train", out, session))
        return opened[-1]

    with flag_errors():
        result = train_continual(cfg.embeddings, ContinualSettings.from_options(cfg), run=open_,
                                 device=session.device, progress=cfg.progress, say=say)
    run = opened[-1]
    result.save(run)
    say(result.table())
    say(f"→ {run.file('table.md')} (table.csv, accuracy_matrix.csv, results.json, "
        f"comparison.png, accuracy_matrices.png, results/)")
    session.close()
    return 0


def as_flags(text: str) -> str:
    """Library text with its parameter names in backticks (```dim_key```) as flags
    (``--dim-key``)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag_name(m.group(1)), text)


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Re-raise a library :class:`UserError` with its parameter names as flags."""
    from narrows.errors import UserError

    try:
        yield
    except UserError as exc:
        raise UserError(as_flags(exc.what), as_flags(exc.fix)) from None


# -- quickstart ---------------------------------------------------------------------------------
QUICKSTART = {"epochs": 20, "batch_size": 64, "num_books": 64, "num_pairs": 256, "dim_key": 8,
              "init_epochs": 5, "probe_optimizer": "adam", "probe_lr": 1e-3}


def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """Class-incremental digits through the frozen features of the quickstart's ResNet-20
    (``out/train/best.pt``): DKVB vs linear probe vs MLP, incremental vs i.i.d., into
    ``out/kvb``."""
    from narrows.runs.files import read_json_file
    from narrows.runs.sweep import flatten_results

    target = out / "kvb"
    embeddings = target / "embeddings"
    execute_embed(EmbedConfig(checkpoint=str(out / "train" / "best.pt"),
                              **cfg.inherited(embeddings)))
    execute_train(TrainConfig(embeddings=str(embeddings), data="digits",
                              model=["dkvb", "linear", "mlp"], protocol=["incremental", "iid"],
                              **QUICKSTART, **cfg.inherited(target / "train")))
    flat = flatten_results(read_json_file(target / "train" / "results.json",
                                          "kvb results file"), None)  # a list or a flat dict
    parts = [f"{m} {100 * flat[f'{m}/incremental.final_accuracy']:.1f}% "
             f"(iid {100 * flat[f'{m}/iid.final_accuracy']:.1f}%)"
             for m in ("dkvb", "linear", "mlp")]
    return (f"class-incremental digits (5 tasks of 2), final accuracy: {', '.join(parts)}: "
            f"{target / 'train' / 'table.md'}")


register(Command(
    words=("kvb", "embed"),
    summary="store a frozen backbone's pooled embeddings of a data set (with their metadata)",
    description="Run a frozen backbone (--checkpoint FILE, or --model NAME with random initial "
    "weights) over the train and/or test split and store its pooled pre-logits features with the "
    "labels in DIR/{backbone}_{data}_{split}.pt (the features are the input of the model's last "
    "nn.Linear, or of the classifier timm names; a decomposed checkpoint works too), where backbone is architecture@sha256-prefix "
    "of the checkpoint. The file records the data spec, split, backbone, checkpoint hash, "
    "preprocessing and dimension; 'kvb train' refuses files whose metadata does not match what "
    "it asks for. Written atomically; a killed run resumes from its partial file.",
    config=EmbedConfig,
    target="narrows.cli.kvb:execute_embed",
    epilog="examples:\n  narrows kvb embed --checkpoint runs/train/resnet20_cifar-digits/best.pt "
    "--out embeddings\n  narrows kvb embed --model resnet20_cifar --data digits --out emb-init"
    "\n  narrows kvb embed --checkpoint resnet50.safetensors --model resnet50 "
    "--data cifar10:data --resize 224 --normalize imagenet",
))
register(Command(
    words=("kvb", "train"),
    summary="class-incremental protocols on stored embeddings: DKVB against the baselines",
    description="Cut the classes into tasks (shuffled by --seed) and train each model on them "
    "one after another with one shared output and no task boundaries (incremental), and on all "
    "classes with the same sample visits (iid). DKVB: keys fitted by EMA k-means on unlabelled "
    "embeddings (--key-data/--key-split), frozen; values zero-initialised and trained by plain "
    "SGD from cached fetch indices; never-fetched pairs pruned at evaluation. Baselines: linear "
    "probe (with or without bias), MLP, ridge variants, and a VQ bottleneck with the same keys "
    "and a trainable decoder. Writes per model and protocol the accuracy matrix (results/), "
    "table.md/table.csv (final average accuracy, forgetting), accuracy_matrix.csv and the "
    "figures comparison.png and accuracy_matrices.png. Re-running resumes: finished models are "
    "read back, the keys are reused. What the embeddings say is the default: the data set (the "
    "only one with train and test embeddings in --embeddings), its classes and their names, a "
    "task size that divides the classes, and epochs, key count and key dimension scaled to the "
    "number and dimension of the embeddings; the choices are printed and saved in config.yaml.",
    config=TrainConfig,
    target="narrows.cli.kvb:execute_train",
    epilog="examples:\n  narrows kvb train --embeddings embeddings\n"
    "  narrows kvb train --embeddings embeddings --data digits --epochs 50 "
    "--batch-size 32 --num-books 128 --num-pairs 512 --dim-key 8\n  narrows kvb train "
    "--embeddings emb --data cifar10:data --key-data cifar100:data --model dkvb linear mlp "
    "ridge vq",
))
