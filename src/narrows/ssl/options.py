"""The options of ``narrows ssl train``, as the library's own defaults (torch-free).

Every option of the upstream ``main_udi.py`` is here with its released default, and so are the
values upstream hard-codes (student temperature, centre momentum, head sizes, crop sizes, SRS
heads) and the choices where the paper and the code differ (``plus_target``,
``global_pairing``) or where upstream has bugs (``compat_upstream``). :data:`PRESETS` are named
sets of changes: ``paper-vits16`` is the README recipe, ``cpu-small`` a small ViT with the
settings advised for small data on a laptop, ``smoke`` a run of seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from narrows import config
from narrows.training.model_kwargs import check_model_kwargs

Method = Literal["udi", "dino"]
unit_closed = config.Range(0.0, 1.0)
scale_pair = config.Range(0.0, 1.0, low_open=True).also(config.increasing)


def _pair(values: Any) -> str | None:
    return None if values is None or len(values) == 2 else "give two numbers (low high)"


@dataclass
class SSLOptions:
    """How ``narrows ssl train`` pretrains a ViT (spec §7 and §13); the defaults are upstream's."""

    model: str = config.option("vit_small_patch16_224", "the ViT to pretrain: any timm "
                        "VisionTransformer name (random initial weights; nothing is "
                        "downloaded)", short="-m")
    model_kwargs: str | None = config.option(None, "further timm arguments of the ViT, e.g. "
                                      "depth=4,patch_size=8", metavar="K=V,...",
                                      check=check_model_kwargs)
    method: Method = config.option("udi", "udi: two class tokens (cls, cls+), SRS patch level and the "
                            "three losses; dino: one class token and DINO's loss exactly")
    img_size: int = config.option(224, "global crop size in pixels (the ViT is built for it)",
                           check=config.positive)
    local_size: int = config.option(96, "local crop size in pixels", check=config.positive)
    local_crops: int = config.option(6, "local crops per image (the README recipe uses 10)",
                              check=config.non_negative)
    global_crops_scale: list[float] = config.option([0.25, 1.0], "area range of the global crops",
                                             check=scale_pair.also(_pair))
    local_crops_scale: list[float] = config.option([0.05, 0.25], "area range of the local crops",
                                            check=scale_pair.also(_pair))
    global_window: int = config.option(3, "SRS window on the global token grid (one sample per "
                                "window: 14×14 tokens, window 3 → 16 samples)", check=config.positive)
    local_window: int = config.option(2, "SRS window on the local token grid (6×6, window 2 → 9)",
                               check=config.positive)
    global_pairing: Literal["shifted_overlap", "nested"] = config.option(
        "shifted_overlap", "how the second global crop relates to the first: shifted_overlap "
        "(the code: overlapping, shifted towards the first) or nested (the paper: cropped "
        "out of the first)")
    compat_upstream: bool = config.option(False, "reproduce the upstream geometry bugs (the column "
                                   "shift computed from the row start, the flip-mixed local "
                                   "reference box, edge-to-edge token centres)")
    out_dim: int = config.option(65536, "K: outputs of the projection head", check=config.at_least(2))
    head_hidden: int = config.option(2048, "hidden width of the head's MLP", check=config.positive)
    head_bottleneck: int = config.option(256, "bottleneck width before the weight-normalised layer",
                                  check=config.positive)
    head_layers: int = config.option(3, "linear layers of the head's MLP", check=config.positive)
    norm_last_layer: bool = config.option(True, "freeze the weight-norm magnitude of the student "
                                   "head's last layer (the README recipe turns it off)")
    use_bn_in_head: bool = config.option(False, "BatchNorm in the head's MLP")
    srs_heads: int | None = config.option(None, "heads of the SRS attention [default: the backbone's]",
                                   check=config.positive)
    alpha: float = config.option(0.5, "patch share of the cls+ target (raise it if training is "
                          "unstable)", check=unit_closed)
    plus_target: Literal["logit_mean", "prob_mixture"] = config.option(
        "logit_mean", "cls+ target: logit_mean (the code: one softmax of blended logits) or "
        "prob_mixture (the paper's figure: a mixture of the teachers' distributions)")
    local_patch: bool = config.option(False, "also distil the SRS patches of local crops (upstream "
                               "computes them and throws them away)")
    momentum_teacher: float = config.option(0.996, "EMA momentum of the teacher, cosine to 1",
                                     check=unit_closed)
    warmup_teacher_temp: float = config.option(0.04, "initial teacher temperature", check=config.positive)
    teacher_temp: float = config.option(0.07, "teacher temperature after the warm-up", check=config.positive)
    warmup_teacher_temp_epochs: int = config.option(30, "epochs of the teacher-temperature warm-up "
                                             "(clamped to the run)", check=config.non_negative)
    student_temp: float = config.option(0.1, "student temperature", check=config.positive)
    center_momentum: float = config.option(0.9, "momentum of the three centres", check=config.unit_open)
    epochs: int = config.option(100, "pretraining epochs", check=config.positive)
    batch_size: int = config.option(64, "images per step per process (upstream: 128 per GPU)",
                             check=config.positive)
    optimizer: Literal["adamw", "sgd", "lars"] = config.option("adamw", "optimizer")
    lr: float = config.option(0.0005, "peak learning rate at batch 256 (scaled linearly by the "
                       "global batch)", check=config.positive)
    min_lr: float = config.option(1e-5, "final learning rate (cosine)", check=config.non_negative)
    warmup_epochs: int = config.option(10, "learning-rate warm-up epochs (clamped to the run)",
                                check=config.non_negative)
    weight_decay: float = config.option(0.04, "initial weight decay", check=config.non_negative)
    weight_decay_end: float = config.option(0.1, "final weight decay (cosine)", check=config.non_negative)
    clip_grad: float = config.option(3.0, "clip each parameter's gradient norm to this (0 = off)",
                              check=config.non_negative)
    freeze_last_layer: int = config.option(1, "epochs during which the head's last layer is frozen",
                                    check=config.non_negative)
    drop_path_rate: float = config.option(0.1, "student stochastic depth", check=config.Range(0.0, 1.0,
                                                                                  high_open=True))
    precision: Literal["auto", "bf16", "fp16", "fp32"] = config.option(
        "auto", "mixed precision: auto = bf16 on GPUs that have it, else fp16 with a scaler; "
        "fp32 on the CPU")
    augment_device: Literal["workers", "cuda"] = config.option(
        "workers", "where the colour operations run: per image in the data-loading workers, or "
        "batched on the training device (cuda: faster when the CPU is the bottleneck; on a CPU "
        "run, batched in the main process). The two draw different random colours")
    workers: int = config.option(0, "data-loading worker processes", check=config.non_negative,
                          affects_result=False)
    knn_every: int = config.option(0, "every N epochs, the teacher's kNN top-1 on the data's labels "
                            "(0 = only at the end when --knn is on)", check=config.non_negative)
    knn: bool = config.option(True, "kNN top-1 of the teacher's cls token (k 20, T 0.07) before and "
                       "after training, on the data's labels")
    knn_images: int = config.option(10_000, "at most this many train (and test) images for the "
                                    "kNN, a fixed random subset of each split",
                                    check=config.positive)

    def check_together(self) -> None:
        """Options that contradict each other, refused before any work."""
        from narrows.errors import UserError

        if self.method == "dino" and self.local_patch:
            raise UserError("--local-patch needs the patch level of --method udi",
                            "drop --local-patch or use --method udi")
        if self.local_size > self.img_size:
            raise UserError(f"--local-size {self.local_size} is larger than --img-size "
                            f"{self.img_size}", "give local crops at most the global size")

    @classmethod
    def from_preset(cls, preset: str, **changes: Any) -> SSLOptions:
        """The options of ``preset`` (see :data:`PRESETS`) with ``changes`` over them."""
        from narrows.errors import UserError

        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}'", f"use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **changes})

    @property
    def num_class_tokens(self) -> int:
        """2 for UDI (cls and cls+), 1 for DINO."""
        return 2 if self.method == "udi" else 1

    @property
    def patch_level(self) -> bool:
        """Whether the SRS patch level (and with two class tokens, cls+) is trained."""
        return self.method == "udi"


#: named sets of changes to the defaults (``--preset``); options given explicitly win
PRESETS: dict[str, dict[str, Any]] = {
    "paper-vits16": {"local_crops": 10, "norm_last_layer": False, "teacher_temp": 0.07,
                     "warmup_teacher_temp_epochs": 30, "warmup_epochs": 10, "epochs": 300,
                     "batch_size": 128},
    "cpu-small": {"img_size": 32, "local_size": 16, "local_crops": 2,
                  "model": "vit_tiny_patch16_224", "model_kwargs": "depth=4,patch_size=4",
                  "out_dim": 256, "head_hidden": 256, "head_bottleneck": 64,
                  "momentum_teacher": 0.99, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04,
                  "warmup_teacher_temp_epochs": 0, "warmup_epochs": 1, "lr": 0.002,
                  "batch_size": 32, "epochs": 20, "drop_path_rate": 0.0},
    "smoke": {"img_size": 32, "local_size": 16, "local_crops": 2,
              "model": "vit_tiny_patch16_224",
              "model_kwargs": "depth=2,patch_size=8,embed_dim=96,num_heads=3",
              "out_dim": 64, "head_hidden": 64, "head_bottleneck": 32,
              "momentum_teacher": 0.99, "warmup_teacher_temp_epochs": 0, "warmup_epochs": 0,
              "batch_size": 8, "epochs": 2, "drop_path_rate": 0.0},
}


PresetName = Literal["paper-vits16", "cpu-small", "smoke"]


@dataclass
class PretrainData:
    """What ``narrows ssl train`` pretrains on (labels are ignored; kNN uses them)."""

    data: str = config.option("shapes", "data spec: digits, shapes[:k=v,...], cifar10:PATH, "
                              "cifar100:PATH, imagenet:PATH, folder:PATH", short="-d")
    image_size: int | None = config.option(None, "served image size for imagenet:/folder: "
                                           "data, before cropping [default: --img-size]",
                                           check=config.positive)
    preset: PresetName | None = config.option(
        None, "named settings under your options: paper-vits16 (the README recipe: 10 local "
        "crops, 300 epochs, unfrozen head norm), cpu-small (a 4-block tiny ViT on 32-px "
        "images with small-data settings: EMA 0.99, teacher τ 0.04, K 256), smoke (seconds)")


def option_names() -> list[str]:
    """The field names of :class:`SSLOptions`."""
    return [f.name for f in fields(SSLOptions)]


@dataclass
class ExportOptions:
    """The options of ``narrows ssl export`` (:func:`narrows.ssl.export.export_checkpoint`)."""

    checkpoint: str | None = config.option(None, "a 'narrows ssl train' checkpoint.pt, or an "
                                           "official UDI checkpoint.pth (required)",
                                           metavar="FILE")
    output: str | None = config.option(None, "the .safetensors file to write [default: "
                                       "backbone-WHICH-TOKENS.safetensors next to the "
                                       "checkpoint]", metavar="FILE")
    which: Literal["teacher", "student"] = config.option(
        "teacher", "which network's backbone (the teacher is the one evaluated)")
    class_tokens: Literal["keep", "drop"] = config.option(
        "keep", "keep: both class tokens (build the model with reg_tokens=1); drop: cls only, "
        "cls+ and its position row removed (a standard one-token ViT)")
    overwrite: bool = config.option(False, "replace the output file if it exists")
