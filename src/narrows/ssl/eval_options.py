"""The options of the ``narrows ssl`` evaluation commands, as the library's defaults (torch-free).

:class:`EvalSubject` names what is evaluated (a checkpoint of any known layout, or a random
ViT) and how its features are computed and cached; one options class per command holds the
rest: :class:`KNNOptions` (``ssl knn``), :class:`LinearOptions` (``ssl linear``),
:class:`FinetuneOptions` (``ssl finetune``: ``narrows train``'s options with the UDI README
recipe as defaults), :class:`AttentionOptions` (``ssl attention``), :class:`PatchProbeOptions`
(``ssl patch-probe``) and :class:`MultiLabelOptions` (``ssl multilabel``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from narrows import config
from narrows.training.model_kwargs import check_model_kwargs
from narrows.training.settings import TrainOptions

#: the parts a feature spec may join with '|' (see :class:`narrows.models.features.FeatureSpec`)
FEATURE_PARTS = ("cls", "cls+", "avgpool", "pre-logits")
lr_list = config.Range(0.0, low_open=True).also(config.not_empty)


def check_feature_spec(text: Any) -> str | None:
    """What is wrong with the feature spec ``text`` (or each of a list of them), or ``None``.

    Same grammar as :meth:`narrows.models.features.FeatureSpec.parse`, checked without torch.
    """
    if text is None:
        return None
    for spec in [text] if isinstance(text, str) else list(text):
        problem = _spec_problem(str(spec))
        if problem:
            return problem
    return None


def _spec_problem(spec: str) -> str | None:
    body, _, n = spec.partition("@")
    if n and not (n.isdigit() and int(n) >= 1):
        return f"'{spec}': the number after @ must be a whole number >= 1"
    parts = body.split("|")
    if any(p not in FEATURE_PARTS for p in parts):
        return f"'{spec}': parts must be among {', '.join(FEATURE_PARTS)}, joined by '|'"
    if len(set(parts)) != len(parts):
        return f"'{spec}': a part is repeated"
    if "pre-logits" in parts and (len(parts) > 1 or n):
        return f"'{spec}': pre-logits stands alone"
    return None


def _check_all_specs(values: Any) -> str | None:
    return check_feature_spec(values) or config.not_empty(values)


@dataclass
class EvalSubject:
    """What the evaluation commands evaluate, on which data, and where its features are cached."""

    checkpoint: str | None = config.option(
        None, "what to evaluate: an 'ssl train' checkpoint.pt, an 'ssl export' file, a "
        "'narrows train' checkpoint, or an official UDI/DINO release (full or backbone-only)",
        metavar="FILE")
    model: str | None = config.option(
        None, "without --checkpoint: a timm ViT with random initial weights from --seed; with a "
        "backbone-only release: the architecture to build [default: read from the weights]",
        short="-m")
    model_kwargs: str | None = config.option(None, "further timm arguments of the ViT, e.g. "
                                             "depth=2,embed_dim=48", metavar="K=V,...",
                                             check=check_model_kwargs)
    class_tokens: int = config.option(2, "class tokens of a randomly initialised ViT (2: cls and "
                                      "cls+, 1: cls only); checkpoints carry their own",
                                      check=config.Range(1, 2))
    which: Literal["teacher", "student"] = config.option(
        "teacher", "which network of a pretraining checkpoint (the teacher is the one evaluated)")
    data: str | None = config.option(None, "data spec [default: the checkpoint's data]",
                                     short="-d")
    image_size: int | None = config.option(None, "image size fed to the ViT [default: the "
                                           "checkpoint's]", check=config.positive)
    cache: str | None = config.option(None, "feature cache directory (reruns reuse it) "
                                      "[default: OUT/features]", metavar="DIR",
                                      affects_result=False)
    cache_dtype: Literal["float32", "float16"] = config.option(
        "float32", "number type of the cached features (float16 halves the disk)")
    feature_batch_size: int = config.batch_size_option(
        256, "images per forward pass of the backbone (the probes' own --batch-size is their "
        "step)")
    workers: int = config.workers_option()


@dataclass
class KNNOptions:
    """How ``narrows ssl knn`` measures weighted-kNN accuracy (DINO's protocol)."""

    features: list[str] = config.option(
        ["cls", "cls+", "cls|cls+", "avgpool"], "feature specs to evaluate (parts cls, cls+, "
        "avgpool joined by '|', @N = class tokens of the last N blocks); parts a model lacks "
        "are dropped with a note", check=_check_all_specs)
    k: list[int] = config.option([10, 20, 100, 200], "numbers of neighbours",
                                 check=config.at_least(1).also(config.not_empty)
                                 .also(config.distinct))
    temperature: float = config.option(0.07, "temperature T of the vote weights exp(sim / T)",
                                       check=config.Range(0.0, low_open=True))
    memory_mb: int = config.option(512, "memory for one chunk of similarities (MiB)",
                                   check=config.positive, affects_result=False)


@dataclass
class LinearOptions:
    """How ``narrows ssl linear`` trains linear heads on frozen features (DINO's protocol)."""

    feature: str | None = config.option(
        None, "feature spec the heads read ('cls|avgpool@4' appends the average patch token) "
        "[default: cls of the last 4 blocks (DINO), of every block of a shallower ViT]",
        check=check_feature_spec)
    lr: list[float] = config.option([0.001], "learning rates, one head each (scaled by the "
                                    "global batch / 256)", check=lr_list)
    lr_min: float = config.option(0.0, "final learning rate of the cosine (per epoch)",
                                  check=config.non_negative)
    epochs: int = config.option(100, "training epochs of the heads", check=config.positive)
    batch_size: int = config.option(256, "images per step (per process under torchrun)",
                                    check=config.positive)
    momentum: float = config.option(0.9, "SGD momentum", check=config.unit_open)
    weight_decay: float = config.option(0.0, "weight decay of the heads",
                                        check=config.non_negative)
    augment: Literal["none", "dino", "udi"] = config.option(
        "none", "none: features computed once and cached; dino: random resized crop + flip; "
        "udi: also RandAugment and random erasing (both through the backbone every epoch)")
    through_backbone: bool = config.option(False, "run the backbone every epoch even without "
                                           "augmentation (benchmark and check)")
    holdout: float = config.option(0.0, "fraction of the training split that selects the "
                                   "learning rate (0: selected on the test split, as DINO)",
                                   check=config.Range(0.0, 1.0, high_open=True))


def _train_field(name: str, default: Any) -> Any:
    """``narrows train``'s option ``name`` (its help, check and group) with another default."""
    meta = {f.name: f for f in dataclasses.fields(TrainOptions)}[name].metadata
    return config.option(default, meta["help"], short=meta["short"], metavar=meta["metavar"],
                         affects_result=meta["affects_result"], check=meta["check"],
                         group=meta["group"])


@dataclass
class FinetuneOptions(TrainOptions):
    """How ``narrows ssl finetune`` trains a pretrained ViT end to end: ``narrows train``'s
    options with the UDI README recipe as defaults (BEiT/DeiT recipe), plus which class
    tokens the classifier keeps."""

    epochs: int = _train_field("epochs", 200)
    batch_size: int = _train_field("batch_size", 256)
    optimizer: Literal["sgd", "adamw"] = _train_field("optimizer", "adamw")
    lr: float = _train_field("lr", 1e-3)  # not scaled by the batch
    weight_decay: float = _train_field("weight_decay", 0.05)
    warmup_epochs: float = _train_field("warmup_epochs", 20.0)
    label_smoothing: float = _train_field("label_smoothing", 0.1)
    layer_decay: float = _train_field("layer_decay", 0.55)
    drop_path: float = _train_field("drop_path", 0.1)
    mixup: float = _train_field("mixup", 0.8)
    cutmix: float = _train_field("cutmix", 1.0)
    randaugment: str | None = _train_field("randaugment", "rand-m9-mstd0.5-inc1")
    random_erasing: float = _train_field("random_erasing", 0.25)
    warmup_lr: float = _train_field("warmup_lr", 1e-6)
    min_lr: float = _train_field("min_lr", 1e-6)
    class_tokens: Literal["keep", "drop"] = config.option(
        "keep", "keep: both class tokens stay (the classifier reads cls); drop: cls+ and its "
        "position row removed (a standard one-token ViT)")
    which: Literal["teacher", "student"] = config.option(
        "teacher", "which network of a pretraining checkpoint is fine-tuned")


def _tokens_problem(values: Any) -> str | None:
    bad = [t for t in values or [] if t not in ("cls", "cls+")]
    if bad:
        return f"{bad[0]!r} is not a class token (give cls, cls+ or both)"
    return config.not_empty(values) or config.distinct(values)


@dataclass
class AttentionOptions:
    """What ``narrows ssl attention`` draws: last-block attention of the class tokens."""

    tokens: list[str] = config.option(["cls", "cls+"], "query tokens (cls+ only for 2-token "
                                      "models)", check=_tokens_problem)
    images: int = config.option(8, "test images to draw (spread over the split)",
                                check=config.positive)
    image: list[str] = config.option([], "image files to draw instead of test images",
                                     metavar="FILE")
    threshold: float | None = config.option(None, "also outline the smallest patch set holding "
                                            "this share of each head's attention (DINO: 0.6)",
                                            check=config.Range(0.0, 1.0, low_open=True))


@dataclass
class PatchProbeOptions:
    """How ``narrows ssl patch-probe`` trains linear per-patch classifiers (shapes: data)."""

    lr: list[float] = config.option([0.001, 0.01, 0.1], "learning rates, one head each",
                                    check=lr_list)
    epochs: int = config.option(20, "training epochs", check=config.positive)
    batch_size: int = config.option(64, "images per step", check=config.positive)


@dataclass
class MultiLabelOptions:
    """How ``narrows ssl multilabel`` trains linear multi-label probes (shapes: data with
    two or more objects)."""

    features: list[str] = config.option(["cls", "cls+", "cls|cls+"], "feature specs, one probe "
                                        "each (1-token models: cls only)",
                                        check=_check_all_specs)
    lr: list[float] = config.option([0.001, 0.01, 0.1], "learning rates, one head each",
                                    check=lr_list)
    epochs: int = config.option(50, "training epochs", check=config.positive)
    batch_size: int = config.option(256, "images per step", check=config.positive)
