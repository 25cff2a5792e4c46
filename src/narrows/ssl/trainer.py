"""UDI (and DINO) pretraining: the loop around the student, the EMA teacher and the loss.

Exact resume: an epoch draws its image order, its views (seeded per image by
:class:`~narrows.ssl.views.ViewDataset`) and its drop-path masks from RNGs seeded by
``(seed, epoch, rank)``, and every schedule is a function of the step, so the state at an epoch
boundary (student, teacher, optimizer, scaler, centres, epoch) is all a checkpoint holds. A run
killed at any point and restarted ends bit-identical to an uninterrupted one on the CPU.

Compared with upstream: the teacher backbone runs once per step (upstream: twice), the student
does no SRS work on local crops unless ``local_patch``, warm-ups are clamped to short runs, a
non-finite loss stops the run with the last good checkpoint kept, and it runs on a CPU, one GPU
or many (torchrun, gloo or nccl).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from narrows.errors import UserError
from narrows.runtime import Distributed, derive_seed
from narrows.ssl.options import SSLOptions

CHECKPOINT = "checkpoint.pt"
RESULT = "pretraining.json"
TERMS = ("g_cl", "g_mcl", "g_pch", "l_cl", "l_mcl")
CHECK_EVERY = 16  # steps between looks at the loss (each look waits for the accelerator)
Say = Callable[[str], None]


@dataclass
class Pretraining:
    """Everything one pretraining run is made of (:func:`build_pretraining`)."""

    options: SSLOptions
    student: nn.Module
    teacher: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    data: Any
    views: Any
    view_options: Any
    seed: int
    device: torch.device
    dist: Distributed

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.data.info.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.data.info.std)


# -- small pieces ----------------------------------------------------------------------------

def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None``: full precision)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def global_batch(options: SSLOptions, dist: Distributed) -> int:
    """Images per optimizer step over all processes."""
    return options.batch_size * dist.world_size


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t ← m·θ_t + (1 − m)·θ_s over every parameter (backbone, SRS, LN_1, head), fused."""
    with torch.no_grad():
        teacher_params = [param.detach() for param in teacher.parameters()]
        student_params = [param.detach() for param in student.parameters()]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def collapsed_terms(row: dict[str, Any], out_dim: int, tolerance: float = 0.01) -> list[str]:
    """The loss terms (and the teacher's entropy) sitting at ln K: a uniform collapse."""
    ln_k = math.log(out_dim)
    names = [*TERMS, "entropy_cls"]
    return [name for name in names if name in row and abs(row[name] - ln_k) < tolerance]


def describe_plan(n_images: int, steps: int, options: SSLOptions, dist: Distributed) -> str:
    """One line: images, epochs × steps, the global batch and the views."""
    return (f"{options.method.upper()} pretraining of {options.model}: {n_images:,} images, "
            f"{options.epochs} epochs × {steps} steps of {global_batch(options, dist)} images "
            f"(2 × {options.img_size} px + {options.local_crops} × {options.local_size} px "
            f"views each, K = {options.out_dim})")


def check_enough_images(n_images: int, options: SSLOptions, dist: Distributed) -> None:
    """A data set smaller than one global batch would train zero steps: refuse it."""
    if n_images < global_batch(options, dist):
        raise UserError(f"the data has {n_images} training images, fewer than one batch of "
                        f"{global_batch(options, dist)}",
                        "lower batch_size (--batch-size) or give more images")


# -- building --------------------------------------------------------------------------------

def build_pretraining(options: SSLOptions, data: str, *, seed: int = 0,
                      device: torch.device | str = "cpu", dist: Distributed = Distributed(),
                      image_size: int | None = None) -> Pretraining:
    """The data, views, student, teacher, loss and optimizer of a run (nothing trained yet),
    as a :class:`Pretraining`.

    ``options`` are checked as the command checks them; ``data`` is any data spec (labels are ignored for training; kNN uses them); images are
    served at ``image_size`` for folder/ImageNet data (default: the global crop size).
    """
    from narrows.config import build
    from narrows.ssl.loss import UDILoss
    from narrows.ssl.model import pair_for
    from narrows.ssl.optim import make_optimizer, parameter_groups
    from narrows.ssl.options import option_names
    from narrows.ssl.views import MultiCropViews
    from narrows.training.setup import training_data

    options = build(SSLOptions, {name: getattr(options, name) for name in option_names()},
                    source="the pretraining options")
    device = torch.device(device)
    bundle = training_data(data, image_size=image_size or options.img_size)
    torch.manual_seed(derive_seed(seed, 0, 0, 11))  # the initial weights: the same on every rank
    student, teacher = pair_for(options)
    student.to(device)
    teacher.to(device)
    loss = UDILoss(options.out_dim, num_class_tokens=options.num_class_tokens,
                   patch_level=options.patch_level, local_patch=options.local_patch,
                   alpha=options.alpha, plus_target=options.plus_target,
                   student_temp=options.student_temp,
                   center_momentum=options.center_momentum).to(device)
    optimizer = make_optimizer(options.optimizer, parameter_groups(student), options.lr)
    dtype = autocast_dtype(options.precision, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    view_options = view_options_of(options, student, bundle.info)
    return Pretraining(options, student, teacher, loss, optimizer, scaler, bundle,
                       MultiCropViews(view_options), view_options, seed, device, dist)


def view_options_of(options: SSLOptions, student: nn.Module, info: Any) -> Any:
    """The :class:`~narrows.ssl.views.ViewOptions` of a run: sizes, windows and the data's
    normalisation; the patch size is the backbone's."""
    from narrows.ssl.views import ViewOptions

    patch = student.backbone.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    return ViewOptions(
        global_size=options.img_size, local_size=options.local_size, patch_size=patch,
        n_local=options.local_crops, global_scale=tuple(options.global_crops_scale),
        local_scale=tuple(options.local_crops_scale), global_window=options.global_window,
        local_window=options.local_window, global_pairing=options.global_pairing,
        compat_upstream=options.compat_upstream, mean=tuple(info.mean), std=tuple(info.std))


# -- the loop --------------------------------------------------------------------------------

@dataclass
class Schedules:
    """Per-step learning rate, weight decay and teacher momentum; per-epoch teacher τ."""

    lr: torch.Tensor
    wd: torch.Tensor
    momentum: torch.Tensor
    teacher_temp: torch.Tensor
    steps_per_epoch: int


def schedules_of(options: SSLOptions, steps: int, dist: Distributed) -> Schedules:
    """The schedules of spec §5.5 and §6 for ``steps`` steps per epoch (warm-ups clamped)."""
    from narrows.ssl.schedules import cosine_schedule, teacher_temperatures

    peak = options.lr * global_batch(options, dist) / 256.0
    return Schedules(
        lr=cosine_schedule(peak, options.min_lr, options.epochs, steps,
                           warmup_epochs=options.warmup_epochs),
        wd=cosine_schedule(options.weight_decay, options.weight_decay_end, options.epochs, steps),
        momentum=cosine_schedule(options.momentum_teacher, 1.0, options.epochs, steps),
        teacher_temp=teacher_temperatures(options.epochs, options.warmup_teacher_temp,
                                          options.teacher_temp,
                                          options.warmup_teacher_temp_epochs),
        steps_per_epoch=steps)


def epoch_loader(p: Pretraining, epoch: int) -> Any:
    """This epoch's batches: a seeded permutation (sharded under torchrun), full batches only.

    The global batch of step i is the same images whatever the number of processes (each rank
    takes every world-size-th image of the permutation)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from narrows.ssl.views import ViewDataset, collate_views

    dataset = ViewDataset(p.data.train("none"), p.views, p.seed,
                          photometric_in_workers=p.options.augment_device == "workers")
    dataset.set_epoch(epoch)
    # one seeded permutation of the images, dealt round-robin to the ranks: N processes see the
    # same global batches as one process
    sampler = DistributedSampler(dataset, num_replicas=p.dist.world_size, rank=p.dist.rank,
                                 shuffle=True, seed=p.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=p.options.batch_size, sampler=sampler,
                      num_workers=p.options.workers, collate_fn=collate_views, drop_last=True,
                      pin_memory=p.device.type == "cuda",
                      persistent_workers=False)


def prepare_batch(batch: dict[str, Any], p: Pretraining, step: int) -> dict[str, Any]:
    """The batch on the device, its crops float and normalised (the colour operations run
    here, batched, when ``augment_device`` is ``cuda``)."""
    from narrows.ssl.views import photometric

    moved = {key: value.to(p.device, non_blocking=True) if torch.is_tensor(value) else value
             for key, value in batch.items()}
    if p.options.augment_device == "workers":
        return moved
    generator = torch.Generator(device=p.device).manual_seed(derive_seed(p.seed, step, 7))
    for key in ("globals", "locals"):
        crops = moved[key]
        if crops.numel():
            flat = crops.flatten(0, 1)
            moved[key] = photometric(flat, p.view_options, generator).view(
                *crops.shape[:2], *flat.shape[1:])
    return moved


def train_step(p: Pretraining, trained: nn.Module, batch: dict[str, Any], step: int,
               epoch: int, schedules: Schedules) -> dict[str, torch.Tensor]:
    """One optimizer step (spec §6's order); returns the detached loss terms."""
    from narrows.ssl.optim import cancel_last_layer, clip_per_tensor, set_schedules

    set_schedules(p.optimizer, float(schedules.lr[step]), float(schedules.wd[step]))
    dtype = autocast_dtype(p.options.precision, p.device)
    autocast = (torch.autocast(p.device.type, dtype=dtype) if dtype is not None
                else nullcontext())
    with autocast:
        with torch.no_grad():
            teacher_out = p.teacher.forward_teacher(batch)
        student_out = trained(batch)
        out = p.loss(student_out, teacher_out, float(schedules.teacher_temp[epoch]))
    p.optimizer.zero_grad(set_to_none=True)
    if p.scaler is not None:
        p.scaler.scale(out.total).backward()
        p.scaler.unscale_(p.optimizer)
    else:
        out.total.backward()
    if p.options.clip_grad > 0:
        clip_per_tensor(p.student, p.options.clip_grad)
    cancel_last_layer(p.student, epoch, p.options.freeze_last_layer)
    if p.scaler is not None:
        p.scaler.step(p.optimizer)
        p.scaler.update()
    else:
        p.optimizer.step()
    ema_update(p.teacher, p.student, float(schedules.momentum[step]))
    return {"loss": out.total.detach(), **{k: v.detach() for k, v in out.terms.items()}}


def _stop_if_not_finite(sums: dict[str, torch.Tensor], epoch: int, step: int,
                        options: SSLOptions, kept: str) -> None:
    if not torch.isfinite(sums["loss"]).item():
        raise UserError(f"pretraining diverged: the loss became NaN or infinite in epoch "
                        f"{epoch + 1}/{options.epochs} by step {step + 1} (--lr {options.lr:g})",
                        "lower --lr (e.g. 10× lower), keep --clip-grad on, or raise --alpha "
                        f"(upstream's advice for unstable runs){kept}")


def train_epoch(p: Pretraining, trained: nn.Module, epoch: int, schedules: Schedules, *,
                progress: bool, say: Say, estimate: bool, logger: Any = None) -> dict[str, Any]:
    """One epoch; returns its row of ``metrics.jsonl`` (means of the terms over the steps).

    An active ``logger`` (:class:`narrows.runs.logger.RunLogger`) gets every step's loss terms,
    learning rate, weight decay, teacher momentum and temperature as ``train/<name>`` at the
    global step (gathered between the looks at the loss: no extra wait for the accelerator).
    """
    from narrows.runtime import format_duration

    torch.manual_seed(derive_seed(p.seed, epoch, p.dist.rank, 3))  # drop-path masks
    loader = epoch_loader(p, epoch)
    steps = schedules.steps_per_epoch
    kept = f"; the checkpoint of epoch {epoch} is kept" if epoch > 0 else ""
    sums: dict[str, torch.Tensor] = {}
    if p.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(p.device)
    bar = _progress(loader, steps, epoch, p.options.epochs, progress and p.dist.is_main)
    from narrows.runs.logger import StepBuffer

    logged = StepBuffer(logger)
    started = time.perf_counter()
    for i, batch in enumerate(bar):
        if i >= steps:
            break
        step = epoch * steps + i
        terms = train_step(p, trained, prepare_batch(batch, p, step), step, epoch, schedules)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.float()
        if logged.active:  # the schedules' values are read only when logging
            logged.add(step, terms, lr=float(schedules.lr[step]), wd=float(schedules.wd[step]),
                       momentum=float(schedules.momentum[step]),
                       teacher_temp=float(schedules.teacher_temp[epoch]))
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == steps:
            _stop_if_not_finite(sums, epoch, i, p.options, kept)
            logged.flush()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{sums['loss'].item() / (i + 1):.3f}")
        if estimate and i == 1:
            per_step = (time.perf_counter() - started) / 2
            left = per_step * (p.options.epochs * steps - step - 1)
            say(f"about {per_step:.2f} s per step on this machine: about "
                f"{format_duration(left)} to go")
    seconds = time.perf_counter() - started
    row = _reduce_terms(sums, steps, p.dist, p.device)
    row.update(epoch=epoch + 1, lr=float(schedules.lr[(epoch + 1) * steps - 1]),
               wd=float(schedules.wd[(epoch + 1) * steps - 1]),
               momentum=float(schedules.momentum[(epoch + 1) * steps - 1]),
               teacher_temp=float(schedules.teacher_temp[epoch]), seconds=seconds,
               images_per_second=steps * global_batch(p.options, p.dist) / max(seconds, 1e-9))
    if p.device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(p.device) / 2**20
    return row


def _progress(loader: Any, steps: int, epoch: int, epochs: int, show: bool) -> Any:
    if not show:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False)


def _reduce_terms(sums: dict[str, torch.Tensor], steps: int, dist: Distributed,
                  device: torch.device) -> dict[str, float]:
    """Means over the epoch's steps (and over ranks under torchrun)."""
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[n], device=device).float() for n in names]) / steps
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(values)
        values /= dist.world_size
    return dict(zip(names, map(float, values.tolist()), strict=True))


# -- checkpoints -----------------------------------------------------------------------------

def save_state(p: Pretraining, path: Any, epoch: int, rows: list[dict[str, Any]],
               knn: dict[str, float]) -> None:
    """Write everything a resumed run needs (plain tensors and data: loads with
    ``weights_only=True``): student, teacher, optimizer, scaler, centres, epoch, options."""
    from narrows.runs.files import atomic_torch_save
    from narrows.runs.results import header, provenance

    def plain(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    atomic_torch_save(path, {
        **header("ssl_checkpoint", 1, provenance(model=p.options.model,
                                                 data=p.data.info.spec, seed=p.seed)),
        "student": plain(p.student), "teacher": plain(p.teacher),
        "optimizer": p.optimizer.state_dict(),
        "scaler": p.scaler.state_dict() if p.scaler is not None else None,
        "loss": plain(p.loss), "epoch": epoch, "options": asdict_plain(p.options),
        "seed": p.seed, "data": p.data.info.spec, "mean": list(p.mean), "std": list(p.std),
        "metrics": rows, "knn": knn})


def asdict_plain(options: SSLOptions) -> dict[str, Any]:
    """The options as a plain dict (only the :class:`SSLOptions` fields)."""
    from narrows.ssl.options import option_names

    full = asdict(options) if type(options) is SSLOptions else vars(options)
    return {name: full[name] for name in option_names()}


def resume_state(p: Pretraining, path: Any) -> tuple[int, list[dict[str, Any]], dict[str, float]]:
    """Load a checkpoint written by :func:`save_state` into ``p`` (strictly); returns the
    finished epochs, the metrics rows and the kNN figures so far."""
    from narrows.models import load_state_dict_strict
    from narrows.runs.files import read_torch_file

    state = read_torch_file(path, "pretraining checkpoint",
                            "pass --overwrite to start the run afresh")
    try:
        load_state_dict_strict(p.student, state["student"], str(path))
        load_state_dict_strict(p.teacher, state["teacher"], str(path))
        load_state_dict_strict(p.loss, state["loss"], str(path))
        p.optimizer.load_state_dict(state["optimizer"])
        if p.scaler is not None and state.get("scaler"):
            p.scaler.load_state_dict(state["scaler"])
        return int(state["epoch"]), list(state["metrics"]), dict(state["knn"])
    except UserError:
        raise
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot resume from {path} ({type(exc).__name__})",
                        "pass --overwrite to start the run afresh") from None


# -- the whole run ---------------------------------------------------------------------------

def knn_of(p: Pretraining) -> float:
    """The teacher's kNN top-1 (cls token, k 20, T 0.07) on the data's train → test labels
    (at most ``knn_images`` of each split: the same fixed random subset at every measurement)."""
    from torch.utils.data import DataLoader, Subset

    from narrows.ssl.knn import teacher_knn
    from narrows.training.batches import Normalizer

    normalize = Normalizer(p.mean, p.std)
    size = p.options.img_size

    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = images.to(p.device)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size),
                                                     mode="bicubic", align_corners=False)
        return normalize(images.clamp(0, 1))

    def batches(split: str) -> DataLoader:
        dataset = p.data.split(split, "none")
        if len(dataset) > p.options.knn_images:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
            dataset = Subset(dataset, sorted(order[:p.options.knn_images].tolist()))
        return DataLoader(dataset, batch_size=256, num_workers=p.options.workers)

    return teacher_knn(p.teacher, batches("train"), batches("test"), prepare=prepare,
                       num_classes=p.data.info.num_classes)


def pretrain(options: SSLOptions, data: str, *, run: Any = None, seed: int = 0,
             device: torch.device | str = "cpu", dist: Distributed = Distributed(),
             image_size: int | None = None, progress: bool = True,
             say: Say = print, command: str = "ssl train") -> Any:
    """Pretrain a ViT with UDI (or DINO), as ``options`` say, on the data spec ``data``
    (served at ``image_size`` for folder/ImageNet data, default the global crop size); returns
    a :class:`~narrows.ssl.result.PretrainResult`.

    With ``run`` (a :class:`narrows.runs.RunDir`), writes ``checkpoint.pt`` every epoch (and
    resumes from it), ``metrics.jsonl``, ``loss.png``, ``pretraining.json`` and the flat
    ``results.json`` (:func:`~narrows.runs.results.flat_summary`, naming ``command``). The
    teacher's kNN top-1 is measured before training and at the end (and every ``knn_every`` epochs) when
    ``options.knn`` is on. ``run.logger`` (see :meth:`RunDir.attach_logger`) gets every step's
    terms and schedules (``train/...``), every epoch's row (``epoch/...`` at the epoch's
    last step) and the loss figure at the end; it is closed when this returns or fails.
    """
    try:
        return _pretrain(options, data, run=run, seed=seed, device=device, dist=dist,
                         image_size=image_size, progress=progress, say=say, command=command)
    finally:
        if run is not None:
            run.close()


def _pretrain(options: SSLOptions, data: str, *, run: Any, seed: int, device: torch.device | str,
              dist: Distributed, image_size: int | None, progress: bool, say: Say,
              command: str = "ssl train") -> Any:
    from narrows.runs.results import provenance
    from narrows.ssl.result import PretrainResult

    p = build_pretraining(options, data, seed=seed, device=device, dist=dist,
                          image_size=image_size)
    options = p.options
    n_images = len(p.data.train("none"))
    check_enough_images(n_images, options, dist)
    steps = n_images // global_batch(options, dist)
    schedules = schedules_of(options, steps, dist)
    start, rows, knn = 0, [], {}
    if run is not None and run.exists(CHECKPOINT):
        start, rows, knn = resume_state(p, run.file(CHECKPOINT))
        if start < options.epochs:
            say(f"resuming {run.path} after epoch {start}")
    say(describe_plan(n_images, steps, options, dist))
    trained = _wrap(p)
    logger = run.logger if run is not None else None
    if logger is not None and logger.active and not logger.config_logged:
        logger.config((run.read_config() or {}).get("options") or asdict_plain(options))
    if logger is not None and start > 0:  # drop what a killed run logged of the epoch redone
        logger.resume_at(start * steps)
    if options.knn and "init" not in knn:
        knn["init"] = knn_of(p)
        say(f"teacher kNN top-1 at initialisation: {100 * knn['init']:.1f}%")
    for epoch in range(start, options.epochs):
        row = train_epoch(p, trained, epoch, schedules, progress=progress, say=say,
                          estimate=epoch == start, logger=logger)
        last = epoch + 1 == options.epochs
        if options.knn and (last or (options.knn_every and (epoch + 1) % options.knn_every == 0)):
            knn[f"epoch {epoch + 1}"] = row["knn_top1"] = knn_of(p)
        rows.append(row)
        if logger is not None:
            logger.scalars(row, (epoch + 1) * steps - 1, prefix="epoch")  # at its last step
        if run is not None and run.writer:
            run.write_metrics(rows)
            save_state(p, run.file(CHECKPOINT), epoch + 1, rows, knn)
        say(_epoch_line(row, options))
        collapsed = collapsed_terms(row, options.out_dim)
        if collapsed:
            say(f"warning: {', '.join(collapsed)} sit at ln K = {math.log(options.out_dim):.3f}:"
                " the outputs look uniform (collapse); try a lower --teacher-temp, a higher "
                "--momentum-teacher or a larger batch")
    result = PretrainResult(options.method, options.model, p.data.info.spec, options.out_dim,
                            options.epochs, rows, knn,
                            checkpoint=str(run.file(CHECKPOINT)) if run is not None else None,
                            provenance=provenance(model=options.model, data=p.data.info.spec,
                                                  seed=seed, options=asdict_plain(options)))
    if run is not None and run.writer:
        result.save(run.file(RESULT))
        figure = result.plot()[0]
        run.logger.figure("loss", figure, options.epochs * steps - 1)
        run.save_figure("loss.png", figure)
        from narrows.runs.results import flat_summary

        run.write_json("results.json", flat_summary(result, command=command))
    return result


def _wrap(p: Pretraining) -> nn.Module:
    """The student as trained: DDP-wrapped under torchrun (SyncBN when the head has BN)."""
    if not p.dist.enabled:
        return p.student
    from torch.nn.parallel import DistributedDataParallel

    module = p.student
    if p.options.use_bn_in_head:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [p.device.index] if p.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def _epoch_line(row: dict[str, Any], options: SSLOptions) -> str:
    terms = "  ".join(f"{name} {row[name]:.3f}" for name in TERMS if name in row)
    knn = f"  kNN {100 * row['knn_top1']:.1f}%" if "knn_top1" in row else ""
    return (f"epoch {row['epoch']:>3}/{options.epochs}  loss {row['loss']:.4f} ({terms})  "
            f"τ_t {row['teacher_temp']:.3f}  {row['images_per_second']:.1f} img/s{knn}")
