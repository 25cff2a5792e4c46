"""``narrows evaluate``: top-1/top-5 of a checkpoint on a data set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from narrows.cli.app import command
from narrows.config import non_negative, option, positive
from narrows.runs.session import CommonOptions, start
from narrows.training.settings import DATA_HELP


@dataclass
class EvaluateConfig(CommonOptions):
    checkpoint: str | None = option(None, "weights to evaluate (.pt/.pth/.safetensors); a "
                                    "narrows checkpoint rebuilds its own model", metavar="FILE")
    data: str | None = option(None, DATA_HELP + " [default: the data the checkpoint was "
                              "trained on]", short="-d")
    model: str | None = option(None, "architecture, for checkpoints not written by narrows",
                               short="-m")
    num_classes: int | None = option(None, "classes of a checkpoint not written by narrows "
                                     "[default: read from its classifier weights]",
                                     check=positive)
    split: Literal["test", "train"] = option("test", "which split to evaluate")
    image_size: int | None = option(None, "served image size for imagenet:/folder: data "
                                    "[default: the checkpoint's input size]",
                                    check=positive)
    batch_size: int = option(256, "images per batch", check=positive, affects_result=False)
    workers: int = option(0, "data-loading worker processes", check=non_negative,
                          affects_result=False)


def execute(cfg: EvaluateConfig) -> int:
    from narrows.errors import UserError
    from narrows.models import load_model
    from narrows.models.inputs import data_for_model
    from narrows.training import Normalizer, evaluate

    if not cfg.checkpoint:
        raise UserError("narrows evaluate needs --checkpoint", "pass --checkpoint FILE")
    session = start(cfg)
    loaded = load_model(cfg.checkpoint, name=cfg.model, num_classes=cfg.num_classes)
    card = loaded.card
    spec = cfg.data or (card.data_spec if card else None)
    if not spec:
        raise UserError(f"{cfg.checkpoint} does not say which data it was trained on",
                        "pass --data SPEC")
    served = data_for_model(spec, card, loaded.model, image_size=cfg.image_size,
                            say=session.say, what=str(cfg.checkpoint))
    data, mean, std = served.bundle, served.mean, served.std
    name = Path(cfg.checkpoint).parent.name + "-" + Path(cfg.checkpoint).stem
    run = session.open(cfg, "evaluate", "evaluate", name, spec, cfg.split)
    dataset = data.split(cfg.split)
    result = evaluate(loaded.model.to(session.device), dataset, Normalizer(mean, std),
                      session.device, batch_size=cfg.batch_size, workers=cfg.workers,
                      dist=session.dist, progress=cfg.progress and session.dist.is_main)
    line = (f"{cfg.checkpoint} on {spec} ({cfg.split}, {result.n} images): top-1 "
            f"{100 * result.top1:.2f}%  top-5 {100 * result.top5:.2f}%  loss {result.loss:.4f}")
    run.write_json("results.json", {"summary": line, "checkpoint": str(cfg.checkpoint),
                                    "data": spec, "split": cfg.split,
                                    "image_size": served.image_size, **result.to_dict()})
    return session.done(f"{line} → {run.file('results.json')}")


command(
    "evaluate", EvaluateConfig, execute,
    summary="top-1/top-5 accuracy of a checkpoint on a data set",
    description="Evaluate a checkpoint. A checkpoint written by narrows carries its model card "
    "(architecture, classes, normalisation, data), so --checkpoint alone is enough; for other "
    "checkpoints give --model and --data. Prints and saves results.json.",
    epilog="examples:\n  narrows evaluate --checkpoint runs/quickstart/train/best.pt\n"
    "  narrows evaluate --checkpoint resnet20-12fca82f.th --model resnet20_cifar "
    "--data cifar10:data")
