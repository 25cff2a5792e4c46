"""``narrows kvb embed | train``: frozen-backbone embeddings and the class-incremental protocols."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from narrows.cli.app import GROUPS, command
from narrows.cli.common import as_flags, flag_errors
from narrows.config import compose
from narrows.kvb.options import ContinualOptions, EmbeddingsOptions, EmbedOptions
from narrows.kvb.store import DEFAULT_EMBEDDINGS
from narrows.runs.logger import LogOptions
from narrows.runs.session import CommonOptions, open_run, start

GROUPS["kvb"] = ("discrete key-value bottleneck: frozen-backbone embeddings, class-incremental "
                 "protocols against linear/MLP/ridge/VQ baselines, the 2-D toy, sweeps")


EmbedConfig = compose("EmbedConfig", EmbedOptions, CommonOptions)
TrainConfig = compose("TrainConfig", ContinualOptions, EmbeddingsOptions, LogOptions,
                      CommonOptions)


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
    return session.done()


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
        # the resolved options are recorded in config.yaml
        resolved = dataclasses.replace(cfg, **dataclasses.asdict(settings))
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
    return session.done()


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


command(
    "kvb embed", EmbedConfig, execute_embed,
    summary="store a frozen backbone's pooled embeddings of a data set (with their metadata)",
    description="Run a frozen backbone (--checkpoint FILE, or --model NAME with random initial "
    "weights) over the train and/or test split and store its pooled pre-logits features with the "
    "labels in DIR/{backbone}_{data}_{split}.pt (the features are the input of the model's last "
    "nn.Linear, or of the classifier timm names; a decomposed checkpoint works too), where backbone is architecture@sha256-prefix "
    "of the checkpoint. The file records the data spec, split, backbone, checkpoint hash, "
    "preprocessing and dimension; 'kvb train' refuses files whose metadata does not match what "
    "it asks for. Written atomically; a killed run resumes from its partial file.",
    epilog="examples:\n  narrows kvb embed --checkpoint runs/train/resnet20_cifar-digits/best.pt "
    "--out embeddings\n  narrows kvb embed --model resnet20_cifar --data digits --out emb-init"
    "\n  narrows kvb embed --checkpoint resnet50.safetensors --model resnet50 "
    "--data cifar10:data --resize 224 --normalize imagenet")
command(
    "kvb train", TrainConfig, execute_train,
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
    epilog="examples:\n  narrows kvb train --embeddings embeddings\n"
    "  narrows kvb train --embeddings embeddings --data digits --epochs 50 "
    "--batch-size 32 --num-books 128 --num-pairs 512 --dim-key 8\n  narrows kvb train "
    "--embeddings emb --data cifar10:data --key-data cifar100:data --model dkvb linear mlp "
    "ridge vq")
