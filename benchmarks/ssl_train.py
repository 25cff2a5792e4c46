"""Pretraining step time: narrows' UDI step, narrows' DINO-mode step, and a DINO step built from
the PyPI package ``lightly`` (``DINOLoss``, ``DINOProjectionHead``, ``update_momentum``).

One optimizer step each, on the same backbone (the same timm ViT), the same crops (narrows'
views of the same images, photometric ops already applied) and the same batch, measured side by
side in one run: interleaved repetitions after a warm-up, rotating which side goes first; ratio
of medians.

* **narrows UDI**: ``narrows.ssl.trainer.train_step`` with ``method="udi"`` (two class tokens,
  SRS on the global crops, the teacher backbone run once, three losses, per-tensor clipping,
  AdamW, EMA);
* **narrows DINO**: the same function with ``method="dino"`` (one class token, no patch level);
* **lightly DINO**: the same ViT with one class token, lightly's ``DINOProjectionHead`` (same
  widths) and ``DINOLoss``; student on every crop (globals and locals as two forward passes, as
  lightly's examples do), teacher on the globals, backward, the same per-tensor clipping, AdamW,
  ``update_momentum``.

Targets: UDI / DINO ≤ 1.15 (upstream measured 1.30, spec §12); narrows DINO / lightly DINO ≤ 1.0.
``lightly`` is a benchmark-only extra (``pip install lightly``); without it only the first ratio
is measured.

    python benchmarks/ssl_train.py [--config small|vits] [--threads 2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Config:
    name: str
    model_kwargs: str
    img_size: int
    local_size: int
    local_crops: int
    out_dim: int
    head_hidden: int
    head_bottleneck: int
    batch: int


CONFIGS = {
    "small": Config("small", "depth=4,patch_size=4", 32, 16, 2, 1024, 512, 128, 16),
    "tiny16": Config("tiny16", "depth=12", 224, 96, 2, 4096, 2048, 256, 4),
}


def _pretraining(config: Config, method: str):
    from narrows.ssl.options import SSLOptions
    from narrows.ssl.trainer import build_pretraining, epoch_loader, schedules_of

    options = SSLOptions(
        model="vit_tiny_patch16_224", model_kwargs=config.model_kwargs, method=method,
        img_size=config.img_size, local_size=config.local_size, local_crops=config.local_crops,
        out_dim=config.out_dim, head_hidden=config.head_hidden,
        head_bottleneck=config.head_bottleneck, batch_size=config.batch, epochs=2,
        warmup_epochs=0, warmup_teacher_temp_epochs=0, drop_path_rate=0.0, knn=False)
    size = config.img_size
    p = build_pretraining(options, f"shapes:classes=4,size={size},train={4 * config.batch},"
                          "test=4")
    batch = next(iter(epoch_loader(p, 0)))
    return p, batch, schedules_of(options, 4, p.dist)


def _narrows_step(config: Config, method: str):
    from narrows.ssl.trainer import prepare_batch, train_step

    p, batch, schedules = _pretraining(config, method)
    batch = prepare_batch(batch, p, 0)
    return lambda: train_step(p, p.student, batch, 0, 0, schedules), batch


def _lightly_step(config: Config, batch: dict):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import update_momentum

    from narrows.models.vit_tokens import create_vit
    from narrows.ssl.optim import clip_per_tensor, make_optimizer, parameter_groups
    from narrows.training.model_kwargs import parse_model_kwargs

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = create_vit("vit_tiny_patch16_224", num_class_tokens=1,
                                       img_size=config.img_size,
                                       **parse_model_kwargs(config.model_kwargs))
            self.head = DINOProjectionHead(self.backbone.embed_dim, config.head_hidden,
                                           config.head_bottleneck, config.out_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    student = Net()
    teacher = Net()  # weight_norm modules cannot be deep-copied: a second build, same weights
    teacher.load_state_dict(student.state_dict())
    for param in teacher.parameters():
        param.requires_grad = False
    criterion = DINOLoss(output_dim=config.out_dim, warmup_teacher_temp_epochs=0)
    optimizer = make_optimizer("adamw", parameter_groups(student), 5e-4)
    globals_ = batch["globals"].flatten(0, 1)
    locals_ = batch["locals"].flatten(0, 1)
    b = batch["globals"].shape[1]

    def step() -> None:
        with torch.no_grad():
            t = teacher(globals_).chunk(2)
        s = [*student(globals_).chunk(2), *student(locals_).split(b)]
        loss = criterion(list(t), s, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_per_tensor(student, 3.0)
        optimizer.step()
        update_momentum(student, teacher, m=0.996)

    return step


def _median_times(sides: dict, repeats: int) -> dict[str, float]:
    for step in sides.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    udi, _ = _narrows_step(config, "udi")
    dino, batch = _narrows_step(config, "dino")
    sides = {"narrows UDI": udi, "narrows DINO": dino}
    if importlib.util.find_spec("lightly") is not None:
        sides["lightly DINO"] = _lightly_step(config, batch)
    else:
        print("lightly is not installed (pip install lightly): its DINO step is skipped")
    medians = _median_times(sides, args.repeats)
    print(f"config {config.name}: {config}, {args.threads} threads, {args.repeats} repeats")
    for name, seconds in medians.items():
        print(f"  {name:<13} {1000 * seconds:8.1f} ms/step")
    print(f"UDI / DINO (narrows): {medians['narrows UDI'] / medians['narrows DINO']:.3f} "
          "(target ≤ 1.15)")
    if "lightly DINO" in medians:
        print(f"narrows DINO / lightly DINO: "
              f"{medians['narrows DINO'] / medians['lightly DINO']:.3f} (target ≤ 1.0)")


if __name__ == "__main__":
    main()
