"""``narrows ssl knn | linear | finetune | attention | patch-probe | multilabel``: evaluations of
a self-supervised ViT (a ``narrows ssl train`` checkpoint, an exported backbone, an official
UDI or DINO release, or a random timm ViT)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from narrows.cli.app import command
from narrows.cli.common import flag_errors
from narrows.config import compose, option
from narrows.runs.logger import LogOptions
from narrows.runs.session import CommonOptions, Session, start
from narrows.ssl.eval_options import (
    AttentionOptions,
    EvalSubject,
    FinetuneOptions,
    KNNOptions,
    LinearOptions,
    MultiLabelOptions,
    PatchProbeOptions,
)

SOURCES = ("Reads an 'ssl train' checkpoint.pt (teacher by default, --which student), an 'ssl "
           "export' file, a 'narrows train' checkpoint, or an official UDI/DINO release (full "
           "or backbone-only); without --checkpoint, --model builds a random timm ViT.")


KNNConfig = compose("KNNConfig", KNNOptions, EvalSubject, CommonOptions)
LinearConfig = compose("LinearConfig", LinearOptions, EvalSubject, CommonOptions)
AttentionConfig = compose("AttentionConfig", AttentionOptions, EvalSubject, CommonOptions)
PatchProbeConfig = compose("PatchProbeConfig", PatchProbeOptions, EvalSubject, CommonOptions)
MultiLabelConfig = compose("MultiLabelConfig", MultiLabelOptions, EvalSubject, CommonOptions)


@dataclass
class FinetuneSource:
    """What ``ssl finetune`` starts from and trains on."""

    checkpoint: str | None = option(None, "the pretrained network: an 'ssl train' checkpoint.pt, "
                                    "an official UDI/DINO release, or an 'ssl export' file",
                                    metavar="FILE")
    data: str | None = option(None, "data spec [default: the data it was pretrained on]",
                              short="-d")


FinetuneConfig = compose("FinetuneConfig", FinetuneOptions, FinetuneSource, LogOptions,
                         CommonOptions)


def _open(cfg: Any, verb: str, need_data: bool = True) -> tuple[Session, Any, Any, Any]:
    """Session, backbone, data (``None`` when not needed and not named) and run directory of
    an evaluation command."""
    from narrows.ssl.backbones import open_subject

    session = start(cfg)
    with flag_errors():
        backbone, bundle = open_subject(cfg, seed=cfg.seed, say=session.say, need_data=need_data)
    data = bundle.info.spec.split(":", 1)[0] if bundle is not None else "images"
    run = session.open(cfg, f"ssl {verb}", f"ssl-{verb}", backbone.id, data)
    return session, backbone, bundle, run


def _evaluate(cfg: Any, verb: str, stem: str, evaluate: Callable[..., Any],
              extra: Callable[[Session, Any], dict[str, Any]]) -> int:
    """Open the backbone, data and run; ``evaluate(backbone, data, cfg, **keywords)`` with the
    feature-pass keywords and ``extra(session, run)``; save ``stem``.json, .csv/.md, .png and
    results.json, and say where."""
    from narrows.runs.results import flat_summary

    session, backbone, bundle, run = _open(cfg, verb)
    with flag_errors():
        result = evaluate(backbone, bundle, cfg, cache=cfg.cache or run.file("features"),
                          device=session.device, batch_size=cfg.feature_batch_size,
                          workers=cfg.workers, progress=cfg.progress, say=session.say,
                          **extra(session, run))
    result.save(run.file(f"{stem}.json"))
    run.write_table(stem, result.to_rows())
    fig, _ = result.plot()
    run.save_figure(f"{stem}.png", fig)
    run.write_json("results.json", flat_summary(result, command=f"ssl {verb}"))
    return session.done(result.summary(), f"→ {run.file(stem + '.json')} ({stem}.csv/.md, "
                        f"{stem}.png, results.json)")


def execute_knn(cfg: KNNConfig) -> int:
    from narrows.ssl.knn_eval import evaluate_knn

    return _evaluate(cfg, "knn", "knn", evaluate_knn,
                     lambda session, run: {"dist": session.dist, "cache_dtype": cfg.cache_dtype})


def execute_linear(cfg: LinearConfig) -> int:
    from narrows.ssl.linear import linear_probe

    return _evaluate(cfg, "linear", "linear", linear_probe,
                     lambda session, run: {"run": run, "dist": session.dist, "seed": cfg.seed})


def execute_patch_probe(cfg: PatchProbeConfig) -> int:
    from narrows.ssl.dense import patch_probe

    return _evaluate(cfg, "patch-probe", "patch_probe", patch_probe,
                     lambda session, run: {"run": run, "seed": cfg.seed})


def execute_multilabel(cfg: MultiLabelConfig) -> int:
    from narrows.ssl.dense import multilabel_probe

    return _evaluate(cfg, "multilabel", "multilabel", multilabel_probe,
                     lambda session, run: {"run": run, "seed": cfg.seed})


def execute_attention(cfg: AttentionConfig) -> int:
    from narrows.runs.results import flat_summary
    from narrows.ssl.attention import visualise_attention

    session, backbone, bundle, run = _open(cfg, "attention", need_data=not cfg.image)
    with flag_errors():
        result = visualise_attention(backbone, bundle, cfg, device=session.device)
    result.save(run.file("attention.json"))
    result.save_figures(run.path)
    run.write_json("results.json", flat_summary(result, command="ssl attention"))
    return session.done(result.summary(), f"→ {run.file('attention-grid.png')} (attention/, "
                        "attention.json, maps)")


def execute_finetune(cfg: FinetuneConfig) -> int:
    from pathlib import Path

    from narrows.errors import UserError
    from narrows.ssl.finetune import finetune

    session = start(cfg)
    if not cfg.checkpoint:
        raise UserError("ssl finetune needs a pretrained backbone", "pass --checkpoint FILE")
    opened = []

    def run() -> Any:  # opened once the checkpoint and options are known to work
        opened.append(session.open(cfg, "ssl finetune", "ssl-finetune",
                                   Path(cfg.checkpoint).parent.name,
                                   (cfg.data or "").split(":", 1)[0]))
        return opened[0]

    with flag_errors():
        result = finetune(cfg.checkpoint, cfg.data, cfg, run=run, device=session.device,
                          dist=session.dist, seed=cfg.seed, progress=cfg.progress,
                          say=session.say)
    return session.done(result.summary(), f"→ {opened[0].path} (best.pt, last.pt, "
                        "metrics.jsonl, curves.png, results.json)")


_EVAL = "Any timm ViT, any data; features are cached in --cache (default OUT/features)."
command("ssl knn", KNNConfig, execute_knn,
        summary="weighted kNN accuracy of frozen features (DINO's protocol)",
        description="L2-normalised features of the training split vote for each test image "
        "with weights exp(cos/T) (T 0.07) over the k nearest (10, 20, 100, 200): top-1 and "
        "top-5 for cls, cls+, cls|cls+ and avgpool (patch tokens only). Chunked (bounded "
        "memory, any test-set size), ties broken by train index then class index. "
        + SOURCES + " " + _EVAL + " Writes knn.json, knn.csv/.md, knn.png.",
        epilog="examples:\n  narrows ssl knn --checkpoint runs/ssl/udi/checkpoint.pt\n"
        "  narrows ssl knn --checkpoint dino_deitsmall16_pretrain.pth --data "
        "imagenet:/data/imagenet --device cuda")
command("ssl linear", LinearConfig, execute_linear,
        summary="linear probe on frozen features (DINO's protocol, lr sweep in one pass)",
        description="Linear heads on the cls tokens of the last 4 blocks (optionally with the "
        "average patch token): N(0, 0.01) init, SGD momentum 0.9, lr × batch/256, cosine per "
        "epoch, 100 epochs; every --lr is a head trained side by side on the same batches. "
        "Without augmentation the features are computed once and cached; --augment dino|udi "
        "runs the backbone every epoch. Resumable. " + SOURCES,
        epilog="example:\n  narrows ssl linear --checkpoint vit.safetensors --data shapes "
        "--lr 0.001 0.01 0.1")
command("ssl attention", AttentionConfig, execute_attention,
        summary="last-block attention maps of cls and cls+, per head",
        description="The last block's attention of the class tokens over the patches (class "
        "and register keys excluded), per head and averaged, on test images spread over the "
        "classes or on image files (--image); --threshold draws DINO's masks (the smallest "
        "set of patches holding that share of the attention). One figure per image and a "
        "grid. Works on any timm ViT, fused attention included. " + SOURCES,
        epilog="example:\n  narrows ssl attention --checkpoint runs/ssl/udi/checkpoint.pt "
        "--images 8 --threshold 0.6")
command("ssl patch-probe", PatchProbeConfig, execute_patch_probe,
        summary="linear probe per patch token on shapes masks: mIoU",
        description="A linear classifier per patch token (background or shape class) trained "
        "on the exact masks of shapes data, reporting mIoU on the patch grid and per pixel: a "
        "small-scale stand-in for dense evaluations (segmentation). " + SOURCES,
        epilog="example:\n  narrows ssl patch-probe --checkpoint runs/ssl/udi/checkpoint.pt "
        "--data shapes:objects=2,rmin=10,rmax=20")
command("ssl multilabel", MultiLabelConfig, execute_multilabel,
        summary="multi-label probe: which shapes an image holds, from cls, cls+ or both",
        description="Linear multi-label probes (one per feature spec) on shapes with several "
        "objects: exact-match accuracy, per-label accuracy and mAP. " + SOURCES,
        epilog="example:\n  narrows ssl multilabel --checkpoint runs/ssl/udi/checkpoint.pt "
        "--data shapes:objects=3,rmin=10,rmax=20")
command("ssl finetune", FinetuneConfig, execute_finetune,
        summary="fine-tune a pretrained ViT end to end (the UDI README recipe)",
        description="Exports the backbone (both class tokens kept, or cls+ dropped) and trains "
        "it with a new classifier as 'narrows train' does, with the BEiT/DeiT recipe as "
        "defaults: AdamW, layer-wise lr decay 0.55, drop path 0.1, mixup 0.8 / cutmix 1.0, "
        "RandAugment, label smoothing 0.1, random erasing, 20 warm-up epochs. Resumable.",
        epilog="example:\n  narrows ssl finetune --checkpoint runs/ssl/udi/checkpoint.pt "
        "--data shapes --epochs 30 --warmup-epochs 3")
