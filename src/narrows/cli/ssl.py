"""``narrows ssl train | export``: UDI (or DINO) pretraining of a ViT, and its backbone as timm."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from narrows.cli.app import GROUPS, command
from narrows.config import compose
from narrows.runs.logger import LogOptions
from narrows.runs.session import CommonOptions, start
from narrows.ssl.options import PRESETS, ExportOptions, PretrainData, SSLOptions

GROUPS["ssl"] = ("self-supervised ViTs: UDI pretraining (two class tokens, SRS patch level, "
                 "three losses) or DINO, and the pretrained backbone as a timm state dict")


@dataclass
class TrainConfig(SSLOptions, PretrainData, LogOptions, CommonOptions):
    PRESETS = PRESETS


ExportConfig = compose("ExportConfig", ExportOptions)


def execute_train(cfg: TrainConfig) -> int:
    from narrows.ssl.trainer import pretrain

    session = start(cfg)
    run = session.open(cfg, "ssl train", "ssl", cfg.method, cfg.preset or cfg.model,
                       cfg.data.split(":", 1)[0])
    result = pretrain(cfg, cfg.data, run=run, seed=cfg.seed, device=session.device,
                      dist=session.dist, image_size=cfg.image_size, progress=cfg.progress,
                      say=session.say)
    return session.done(result.summary(),
                        f"→ {run.file('checkpoint.pt')} (metrics.jsonl, loss.png, "
                        "pretraining.json); 'narrows ssl export' gives the backbone as timm")


def execute_export(cfg: ExportConfig) -> int:
    from narrows.ssl.export import export_checkpoint

    exported = export_checkpoint(cfg.checkpoint, cfg.output, which=cfg.which,
                                 class_tokens=cfg.class_tokens, overwrite=cfg.overwrite)
    print(exported.summary())
    print(f"→ {exported.path}")
    return 0


# -- quickstart ---------------------------------------------------------------------------------
QUICKSTART = {"preset": "cpu-small", "data": "shapes:classes=4,size=32,train=512,test=200",
              "epochs": 6, "batch_size": 32, "global_window": 2, "local_window": 1,
              "model_kwargs": "depth=4,patch_size=8,embed_dim=96,num_heads=3"}


def quickstart_step(cfg: CommonOptions, out: Path) -> str:
    """A short UDI run on shapes (cpu-small): the loss curve and the teacher's kNN top-1 before
    and after, into ``out/ssl``."""
    from narrows.ssl.options import PRESETS as presets
    from narrows.ssl.result import PretrainResult

    target = out / "ssl"
    options = {**presets[QUICKSTART["preset"]], **QUICKSTART}
    execute_train(TrainConfig(**options, **cfg.inherited(target)))
    result = PretrainResult.load(target / "pretraining.json")
    return f"{result.summary()}: {target / 'loss.png'}"


command("ssl train", TrainConfig, execute_train,
        summary="pretrain a ViT with UDI (or DINO) on any data, labels ignored",
        description="Self-distillation of a student ViT into an EMA teacher (Su & Ji, ECCV "
        "2024): two class tokens (cls, cls+), stratified random sampling of patches and three "
        "losses (cls, cls+ against a multi-modal target, patch), or DINO exactly with --method "
        "dino. Any timm ViT at any size; a CPU, one GPU or many (torchrun). Writes "
        "checkpoint.pt every epoch (a rerun resumes), metrics.jsonl (the five loss terms, lr, "
        "wd, momentum, teacher temperature, images/s), loss.png (against ln K, where a "
        "collapsed run sits) and pretraining.json; measures the teacher's kNN top-1 on the "
        "data's labels before and after. Options: --preset first, then --config, then flags.",
        epilog="examples:\n  narrows ssl train --preset smoke --data digits\n"
        "  narrows ssl train --preset cpu-small --data shapes:objects=2 --epochs 30\n"
        "  torchrun --nproc_per_node 8 -m narrows ssl train --preset paper-vits16 "
        "--data imagenet:/data/imagenet --device cuda")
command("ssl export", ExportConfig, execute_export,
        summary="write the pretrained backbone as a plain timm ViT state dict (safetensors)",
        description="Take the teacher (or student) backbone of a 'narrows ssl train' "
        "checkpoint or of an official UDI checkpoint.pth, keep both class tokens (timm "
        "reg_tokens=1) or drop cls+, and write a .safetensors file that timm.create_model(name, "
        "checkpoint_path=FILE) and narrows --checkpoint load strictly. Says which tokens it "
        "kept and how to build the model.",
        epilog="example:\n  narrows ssl export --checkpoint runs/ssl/udi-smoke-digits/"
        "checkpoint.pt --class-tokens drop --output vit.safetensors")
