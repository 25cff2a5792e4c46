"""The one supervised training loop: checkpoint every epoch, exact resume, torchrun-aware.

Exact resume: every epoch draws its data order, augmentations and dropout from RNGs seeded
by ``(seed, epoch, rank)`` and the learning rate is a pure function of progress, so the state
at an epoch boundary (weights, optimizer buffers, epoch) is all that must be saved. A run
killed at any point and restarted ends with the same weights as an uninterrupted one on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from narrows.data.base import DataBundle
from narrows.errors import UserError
from narrows.runs.run import RunDir
from narrows.runtime import Distributed, derive_seed
from narrows.training.batches import Normalizer
from narrows.training.evaluate import EvalResult, evaluate
from narrows.training.settings import TrainSettings, learning_rate

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
LAST, BEST, INIT = "last.pt", "best.pt", "init.pt"
CHECK_EVERY = 16  # steps between looks at the loss (each look waits for the accelerator)


class Diverged(UserError):
    """The loss (or the weights) became NaN or infinite: training cannot go on."""

    def __init__(self, happened: str, lr: float, kept: str = "") -> None:
        self.happened, self.lr = happened, lr
        super().__init__(
            f"training diverged: {happened} (--lr {lr:g})",
            "the learning rate (or weight decay) is likely too high: train again with a lower "
            f"--lr, e.g. 10× lower{kept}",
        )


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TrainResult:
    """What a finished (or already finished) run reports."""

    epochs: int
    resumed_from: int
    best_top1: float
    final: EvalResult | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: str | None = None
    best_checkpoint: str | None = None

    def summary(self) -> str:
        """One line: the final and best test top-1 and where the weights are."""
        if self.final is None:
            return (f"trained {self.epochs} epoch{'s' * (self.epochs != 1)}; weights in "
                    f"{self.last_checkpoint}")
        return (f"done: test top-1 {100 * self.final.top1:.2f}% (best {100 * self.best_top1:.2f}%) "
                f"after {self.epochs} epoch{'s' * (self.epochs != 1)}; weights in "
                f"{self.best_checkpoint}")


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """The plain supervised loss ``fit`` uses by default, with ``label_smoothing`` (0: none):
    a ``loss_fn(model, inputs, labels)`` returning ``(loss, logits)`` of a batch."""
    def loss_fn(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
        logits = model(inputs)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing), logits

    return loss_fn


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """SGD (Nesterov off) or AdamW over ``model``'s trainable parameters, as ``settings`` say
    (optimizer, lr, momentum, weight decay); weight decay is not applied to biases and norm
    weights. With ``layer_decay < 1`` the groups are
    :func:`narrows.training.recipes.layer_decay_groups` (each with its ``lr_scale``, and no
    weight decay on position embedding and class tokens either)."""
    if settings.layer_decay < 1:
        from narrows.training.recipes import layer_decay_groups

        groups = layer_decay_groups(model, weight_decay=settings.weight_decay,
                                    layer_decay=settings.layer_decay)
    else:
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": settings.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    raise UserError(f"unknown optimizer '{settings.optimizer}'", "use sgd or adamw")


def epoch_loader(
    dataset: Dataset, settings: TrainSettings, epoch: int, dist: Distributed, pin: bool
) -> DataLoader:
    """The shuffled loader of ``dataset`` for ``epoch``; its order depends only on (seed, epoch).

    Batch size, workers and seed come from ``settings``; ``pin`` pins host memory. Under
    ``dist`` each rank gets its share."""
    if dist.enabled:
        sampler: Any = DistributedSampler(
            dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=settings.seed
        )
        sampler.set_epoch(epoch)
        per_rank = len(sampler)
    else:
        generator = torch.Generator().manual_seed(derive_seed(settings.seed, epoch))
        sampler = RandomSampler(dataset, generator=generator)
        per_rank = len(dataset)
    # BatchNorm cannot train on a last batch of one image: drop it in that case only.
    drop_last = per_rank % settings.batch_size == 1
    loader_gen = torch.Generator().manual_seed(derive_seed(settings.seed, epoch, dist.rank, 1))
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.workers,
        drop_last=drop_last,
        pin_memory=pin,
        generator=loader_gen,
        persistent_workers=False,
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    epoch: int,
    normalizer: Normalizer,
    device: torch.device,
    loss_fn: LossFn,
    *,
    progress: bool = False,
    dist: Distributed | None = None,
    logger: Any = None,
) -> EpochStats:
    """One pass of ``model`` over ``loader`` (``epoch``: its 0-based number), stepping
    ``optimizer``; the learning rate follows the schedule of ``settings`` every step.

    Batches are normalised with ``normalizer``; ``loss_fn(model, inputs, labels)`` gives
    ``(loss, logits)``. Returns the epoch's mean loss, accuracy, image count and seconds.

    A NaN or infinite loss raises :class:`Diverged` naming the first such step; the loss is
    looked at every ``CHECK_EVERY`` steps and at the last (all ranks agree under ``dist``).

    With an active ``logger`` (a :class:`narrows.runs.logger.RunLogger`), every step's
    ``train/loss`` and ``train/lr`` are logged at the global step ``epoch · steps + step``
    (gathered between the looks at the loss, so logging adds no wait for the accelerator).
    """
    from tqdm.auto import tqdm

    model.train()
    steps = max(len(loader), 1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    # the first step with a non-finite loss, ``steps`` while there is none: kept on the device
    first_bad = torch.full((), steps, dtype=torch.int64, device=device)
    start = time.perf_counter()
    # disable=None: bars on a terminal, none in logs and pipes
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{settings.epochs}", leave=False,
               disable=None if progress else True)
    from narrows.runs.logger import StepBuffer

    logged = StepBuffer(logger)
    for step, (images, labels) in enumerate(bar):
        lr = learning_rate(settings, epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr
        inputs = normalizer(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        loss, logits = loss_fn(model, inputs, labels)
        first_bad = torch.where(torch.isfinite(loss.detach()), first_bad,
                                torch.clamp(first_bad, max=step))
        logged.add(epoch * steps + step, {"loss": loss}, lr=lr)
        if step % CHECK_EVERY == CHECK_EVERY - 1 or step == steps - 1:
            _stop_if_bad(first_bad, steps, epoch, settings, dist)
            logged.flush()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += n
        if progress and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}")
    _stop_if_bad(first_bad, steps, epoch, settings, dist)  # a loader shorter than announced
    logged.flush()
    seconds = time.perf_counter() - start
    return EpochStats(float(loss_sum) / max(seen, 1), float(correct) / max(seen, 1), seen, seconds)


def fit(
    model: nn.Module,
    data: DataBundle,
    settings: TrainSettings,
    *,
    card: Any,
    device: torch.device,
    run: RunDir | None = None,
    dist: Distributed = Distributed(),
    loss_fn: LossFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` and evaluate on its test split after every epoch.

    With ``run``, writes ``last.pt`` (everything needed to resume), ``best.pt`` (weights and
    model card of the best test top-1), ``metrics.jsonl`` and ``curves.png`` every epoch, and
    resumes from ``last.pt`` when it is there. ``card`` is the model card (``narrows.models.
    ModelCard``) stored in each checkpoint. ``loss_fn(model, inputs, labels) -> (loss, logits)``
    replaces the cross-entropy (order losses, CSG, ...). ``settings`` (a :class:`TrainSettings`)
    hold the epochs, optimizer, schedule and batches; ``on_epoch_end(epoch, row)`` is called
    after each epoch with its 1-based number and metrics row. Returns the :class:`TrainResult`.

    With ``run``, ``run.logger`` (see :meth:`RunDir.attach_logger`) gets the config, every
    step's ``train/loss`` and ``train/lr``, every epoch's row as ``epoch/<name>`` at the
    epoch's number and the curves figure; it is closed when ``fit`` returns or fails.
    """
    try:
        return _fit(model, data, settings, card=card, device=device, run=run, dist=dist,
                    loss_fn=loss_fn, progress=progress, log=log, on_epoch_end=on_epoch_end)
    finally:
        if run is not None:
            run.close()


def _fit(model: nn.Module, data: DataBundle, settings: TrainSettings, *, card: Any,
         device: torch.device, run: RunDir | None, dist: Distributed, loss_fn: LossFn | None,
         progress: bool, log: Callable[[str], None],
         on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    mixing = settings.mixup > 0 or settings.cutmix > 0
    if mixing and loss_fn is not None:
        raise UserError("--mixup/--cutmix need the plain cross-entropy, and this command "
                        "trains with a loss of its own", "drop --mixup and --cutmix")
    if mixing:
        from narrows.training.recipes import mixup_loss

        loss_fn = mixup_loss(settings, data.info.num_classes)
    loss_fn = loss_fn or cross_entropy(settings.label_smoothing)
    model.to(device)
    normalizer = Normalizer(card.mean, card.std)
    train_set = data.train(settings.augment)
    augmenting = settings.random_erasing > 0 or str(settings.randaugment or "none").lower() != "none"
    if augmenting:
        from narrows.training.recipes import Augmented, train_transform  # only when asked

        train_set = Augmented(train_set, train_transform(settings, card.mean, card.std))
    test_set = data.test()
    optimizer = make_optimizer(model, settings)
    start_epoch, best_top1, rows = 0, float("-inf"), []
    if run is not None and run.exists(LAST):
        start_epoch, best_top1, rows = _resume(run, model, optimizer)
        if start_epoch < settings.epochs:
            log(f"resuming {run.path} after epoch {start_epoch}")
    resumed_from = start_epoch
    trained = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if run is not None and run.writer and start_epoch == 0 and not run.exists(INIT):
        from narrows.runs.files import atomic_torch_save

        # the weights before training: "the same network at initialisation" for analyses
        atomic_torch_save(run.file(INIT), {"state_dict": model.state_dict(),
                                           "narrows_card": card.to_dict(), "epoch": 0})
    final: EvalResult | None = None
    show = progress and dist.is_main
    logger = run.logger if run is not None else None
    if logger is not None and logger.active and not logger.config_logged:
        logger.config((run.read_config() or {}).get("options") or {})
    for epoch in range(start_epoch, settings.epochs):
        torch.manual_seed(derive_seed(settings.seed, epoch, dist.rank, 2))
        if mixing:  # timm's Mixup draws from numpy's global generator
            import numpy as np

            np.random.seed(derive_seed(settings.seed, epoch, dist.rank, 3) % 2**32)
        if augmenting:  # RandAugment and RandomErasing draw from Python's (workers=0)
            import random

            random.seed(derive_seed(settings.seed, epoch, dist.rank, 4))
        loader = epoch_loader(train_set, settings, epoch, dist, pin=device.type == "cuda")
        if logger is not None and epoch == start_epoch > 0:  # steps count from the start
            logger.resume_at(epoch * len(loader))
        kept = (f"; the last good checkpoint, {run.file(LAST)} (epoch {epoch}), is kept"
                if run is not None and epoch > 0 else "")
        try:
            stats = train_one_epoch(trained, loader, optimizer, settings, epoch, normalizer,
                                    device, loss_fn, progress=show, dist=dist, logger=logger)
        except Diverged as exc:
            raise Diverged(exc.happened, exc.lr, kept) from None
        stats = _reduce_stats(stats, dist, device)
        _sync_buffers(model, dist)
        _check_weights(model, epoch, settings, kept)  # never save a non-finite checkpoint
        final = evaluate(model, test_set, normalizer, device, batch_size=settings.eval_batch_size,
                         workers=settings.workers, dist=dist)
        row = {
            "epoch": epoch + 1,
            "lr": learning_rate(settings, epoch + 1 - 1e-9),
            "train_loss": stats.loss,
            "train_top1": stats.accuracy,
            "test_loss": final.loss,
            "test_top1": final.top1,
            "test_top5": final.top5,
            "seconds": stats.seconds,
            "images_per_second": stats.images_per_second,
        }
        epoch_metrics = getattr(loss_fn, "epoch_metrics", None)
        if callable(epoch_metrics):  # a loss may report its own per-epoch figures
            row.update(epoch_metrics())
        rows.append(row)
        improved = final.top1 > best_top1
        best_top1 = max(best_top1, final.top1)
        # one x axis for everything: the epoch's values at the step of its last batch (a
        # resume's purge then keeps finished epochs and drops the unfinished one)
        at_step = (epoch + 1) * len(loader) - 1
        if logger is not None:
            logger.scalars(row, at_step, prefix="epoch")
        if run is not None and run.writer:
            _save_epoch(run, model, optimizer, card, epoch + 1, best_top1, rows, improved,
                        title=_curves_title(card, len(train_set), len(test_set)), step=at_step)
        if dist.is_main:
            log(_epoch_line(row, settings.epochs))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    if final is None and rows:
        final = EvalResult(rows[-1]["test_top1"], rows[-1]["test_top5"], rows[-1]["test_loss"],
                           len(test_set))
    return TrainResult(
        epochs=settings.epochs,
        resumed_from=resumed_from,
        best_top1=best_top1,
        final=final,
        metrics=rows,
        last_checkpoint=str(run.file(LAST)) if run else None,
        best_checkpoint=str(run.file(BEST)) if run else None,
    )


def _stop_if_bad(first_bad: torch.Tensor, steps: int, epoch: int, settings: TrainSettings,
                 dist: Distributed | None) -> None:
    """Raise :class:`Diverged` when some step (on any rank) had a non-finite loss."""
    if dist is not None and dist.enabled:
        import torch.distributed as tdist

        first_bad = first_bad.clone()
        tdist.all_reduce(first_bad, op=tdist.ReduceOp.MIN)
    step = int(first_bad.item())
    if step < steps:
        raise Diverged(f"the loss became NaN or infinite at epoch {epoch + 1}/{settings.epochs}"
                       f", step {step + 1}/{steps}", settings.lr)


def _check_weights(model: nn.Module, epoch: int, settings: TrainSettings, kept: str) -> None:
    """Raise :class:`Diverged` when a weight or buffer is no longer finite after ``epoch``."""
    from narrows.models.factory import first_nonfinite

    bad = first_nonfinite(model)
    if bad is not None:
        raise Diverged(f"the weights became {bad[1]} (first in '{bad[0]}') during epoch "
                       f"{epoch + 1}/{settings.epochs}", settings.lr, kept)


def _curves_title(card: Any, n_train: int, n_test: int) -> str:
    """``model on data (N train / M test images, S px)`` for the training curves."""
    from narrows.models.registry import display_name

    model = display_name(str(getattr(card, "architecture", "model")))
    data = getattr(card, "data_spec", None)
    size = getattr(card, "input_size", None)
    where = f" on {data}" if data else ""
    px = f", {size} px" if size else ""
    return f"{model}{where} ({n_train:,} train / {n_test:,} test images{px})"


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f}  "
        f"train {100 * row['train_top1']:.2f}%  test {100 * row['test_top1']:.2f}% "
        f"(top-5 {100 * row['test_top5']:.2f}%)  {row['seconds']:.1f}s "
        f"{row['images_per_second']:.0f} img/s"
    )


def _sync_buffers(model: nn.Module, dist: Distributed) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), which is what rank 0 saves.

    DDP broadcasts buffers at the start of each forward, so after the last step of an epoch
    each rank holds its own running statistics; evaluation and checkpoints need one model.
    """
    if not dist.enabled:
        return
    import torch.distributed as tdist

    for buffer in model.buffers():
        tdist.broadcast(buffer, src=0)


def _reduce_stats(stats: EpochStats, dist: Distributed, device: torch.device) -> EpochStats:
    if not dist.enabled:
        return stats
    import torch.distributed as tdist

    t = torch.tensor([stats.loss * stats.images, stats.accuracy * stats.images, stats.images],
                     dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    n = max(t[2].item(), 1.0)
    return EpochStats(t[0].item() / n, t[1].item() / n, int(t[2].item()), stats.seconds)


def _save_epoch(run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer, card: Any,
                epoch: int, best_top1: float, rows: list[dict[str, Any]], improved: bool,
                title: str | None = None, step: int = 0) -> None:
    from narrows.runs.files import atomic_torch_save

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if improved:
        atomic_torch_save(run.file(BEST), {"state_dict": state, "narrows_card": card.to_dict(),
                                           "epoch": epoch, "test_top1": best_top1})
    # metrics first, then the checkpoint: a kill in between leaves metrics one epoch ahead,
    # which _resume trims to the checkpoint's epoch.
    run.write_metrics(rows)
    atomic_torch_save(run.file(LAST), {
        "state_dict": state,
        "narrows_card": card.to_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "best_top1": best_top1,
    })
    try:
        from narrows.plotting import plot_training_curves

        fig, _ = plot_training_curves(rows, title=title)
        run.logger.figure("curves", fig, step)
        run.save_figure("curves.png", fig)
        import matplotlib.pyplot as plt

        plt.close(fig)
    except ImportError:  # pragma: no cover - matplotlib is a dependency; stay robust
        pass


def _resume(run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer):
    from narrows.models import load_state_dict_strict

    try:
        state = torch.load(run.file(LAST), map_location="cpu", weights_only=True)
        load_state_dict_strict(model, state["state_dict"], str(run.file(LAST)))
        from narrows.models.factory import check_finite

        check_finite(model, str(run.file(LAST)))
        optimizer.load_state_dict(state["optimizer"])
        epoch, best = int(state["epoch"]), float(state["best_top1"])
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot resume from {run.file(LAST)} ({type(exc).__name__})",
                        "pass --overwrite to start the run afresh") from None
    rows = [r for r in run.read_metrics() if r.get("epoch", 0) <= epoch]
    return epoch, best, rows
