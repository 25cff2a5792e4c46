"""Linear probing of a frozen backbone (DINO's protocol), several learning rates in one run.

One :class:`MultiHeadLinear` holds a linear classifier per learning rate. Every head starts from
the same draw (weights N(0, 0.01), bias 0), sees the same batches in the same order and has its
own parameter group; the loss is the sum of the heads' losses, so each head's gradient is its
own and a sweep over ``[a, b, c]`` trains head ``b`` exactly as a run with ``[b]`` alone. The
optimiser is SGD with momentum, the learning rate of head ``h`` is ``lr_h × global batch /
256``, annealed by a cosine to ``lr_min`` once per epoch.

Two paths: with ``augment="none"`` the features are computed once (cached on disk) and the heads
train on them (:func:`train_heads`); otherwise every epoch runs the frozen backbone on augmented
images (``dino``: the data's ``resized-crop-flip``; ``udi``: ``training.recipes``). A killed
run continues from ``linear-state.pt`` after its last finished epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.runs.results import JsonResult
from narrows.runtime import Distributed, derive_seed

if TYPE_CHECKING:
    from narrows.runs import RunDir

FORMAT_KIND, FORMAT_VERSION = "ssl.linear", 1
STATE_FILE = "linear-state.pt"
STATE_FORMAT = 1
INIT_STD = 0.01
INIT_STREAM = 101  # derive_seed(seed, INIT_STREAM): the heads' initial draw
HOLDOUT_STREAM = 102  # derive_seed(seed, HOLDOUT_STREAM): which train rows select the lr
REFERENCE_BATCH = 256  # lr × global batch / REFERENCE_BATCH (Goyal et al.)


# --- heads ---------------------------------------------------------------------------------


class MultiHeadLinear(nn.Module):
    """``len(lrs)`` independent linear maps ``dim → num_classes`` (``lrs``: one head per
    learning rate, kept as ``self.lrs``), all starting from one N(0, 0.01) draw of generator
    ``derive_seed(seed, 101)`` with bias 0.

    ``forward(x [..., dim]) -> [H, ..., num_classes]``: head ``h``'s logits at index ``h``.
    """

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], *, seed: int = 0) -> None:
        super().__init__()
        if not lrs:
            raise UserError("the linear probe got no learning rate", "give at least one lr")
        self.lrs = [float(lr) for lr in lrs]
        generator = torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM))
        start = torch.randn(num_classes, dim, generator=generator) * INIT_STD
        self.heads = nn.ModuleList()
        for _ in self.lrs:
            head = nn.Linear(dim, num_classes)
            with torch.no_grad():
                head.weight.copy_(start)
                head.bias.zero_()
            self.heads.append(head)

    @property
    def weight(self) -> Tensor:
        """The heads' weights stacked, ``[H, num_classes, dim]`` (a copy)."""
        return torch.stack([head.weight.detach() for head in self.heads])

    @property
    def bias(self) -> Tensor:
        """The heads' biases stacked, ``[H, num_classes]`` (a copy)."""
        return torch.stack([head.bias.detach() for head in self.heads])

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([head(x) for head in self.heads])

    def param_groups(self, global_batch: int) -> list[dict[str, Any]]:
        """One optimiser group per head, at ``lr_h × global_batch / 256``."""
        return [{"params": list(head.parameters()), "lr": scaled_lr(lr, global_batch),
                 "base_lr": scaled_lr(lr, global_batch)}
                for head, lr in zip(self.heads, self.lrs, strict=True)]


def scaled_lr(lr: float, global_batch: int) -> float:
    """The learning rate ``lr`` applies at a global batch of ``global_batch`` images."""
    return lr * global_batch / REFERENCE_BATCH


def cosine_lr(base: float, epoch: int, epochs: int, lr_min: float = 0.0) -> float:
    """The lr of ``epoch`` (0-based) of ``epochs``: a cosine from ``base`` to ``lr_min``
    (``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs, eta_min=lr_min)`` stepped once
    per epoch)."""
    return lr_min + (base - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def make_optimizer(heads: MultiHeadLinear, *, global_batch: int, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.SGD:
    """SGD over ``heads`` with one group per head (``global_batch``: images per step over all
    processes; ``momentum``, ``weight_decay`` as in SGD)."""
    return torch.optim.SGD(heads.param_groups(global_batch), lr=0.0, momentum=momentum,
                           weight_decay=weight_decay)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The order of ``n`` training rows in ``epoch`` (``seed``: the run's seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))


# --- the generic loop over epochs, with resume ---------------------------------------------

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits [H, ...], targets) -> per-head loss [H]
Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]  # epoch -> (inputs, targets)
Evaluate = Callable[[nn.Module], list[dict[str, float]]]  # heads -> one dict per head


def cross_entropy_per_head(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of each head, ``[H]``; ``logits`` ``[H, ..., C]``, ``targets``
    ``[...]`` (every leading position is one sample: images, or patches of images)."""
    flat = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    return torch.stack([F.cross_entropy(head, targets.reshape(-1)) for head in flat])


def fit_heads(heads: MultiHeadLinear, optimizer: torch.optim.Optimizer, *, epochs: int,
              lr_min: float, batches: Batches, loss_fn: LossFn, evaluate: Evaluate,
              state_path: str | Path | None = None, stamp: dict[str, Any] | None = None,
              model: nn.Module | None = None, device: torch.device | str = "cpu",
              dist: Distributed = Distributed(), say: Callable[[str], None] | None = None,
              name: str = "linear probe") -> list[dict[str, Any]]:
    """Train ``heads`` for ``epochs`` epochs and return one row per (head, epoch).

    ``batches(epoch)`` yields ``(inputs, targets)``; ``loss_fn`` gives each head's loss (their
    sum is minimised); ``evaluate(heads)`` measures every head after each epoch (its dicts go
    into the rows, with ``lr``, ``epoch``, ``train_loss``). ``optimizer`` has one group per head
    whose ``base_lr`` the cosine to ``lr_min`` starts from. ``model`` is what is called on the
    inputs (``heads`` wrapped in DDP under torchrun; default ``heads``). After every epoch the
    heads, optimizer and rows are written to ``state_path`` with ``stamp`` (what else decides
    the outcome); a later call with the same stamp continues after the last written epoch.
    ``name`` says which probe resumed.
    """
    model = heads if model is None else model
    stamp = dict(stamp or {})
    rows: list[dict[str, Any]] = []
    start = _restore(heads, optimizer, state_path, stamp, rows)
    if start and say is not None:
        say(f"{name}: resuming after epoch {start} of {epochs}")
    for epoch in range(start, epochs):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(group["base_lr"], epoch, epochs, lr_min)
        heads.train()
        total = torch.zeros(len(heads.lrs), dtype=torch.float64)
        seen = 0
        for inputs, targets in batches(epoch):
            inputs, targets = inputs.to(device), targets.to(device)
            losses = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            total += losses.detach().double().cpu() * len(inputs)
            seen += len(inputs)
        if dist.enabled:
            import torch.distributed as tdist

            counts = torch.cat([total, torch.tensor([float(seen)], dtype=torch.float64)])
            counts = counts.to(device)
            tdist.all_reduce(counts)
            total, seen = counts[:-1].cpu(), int(counts[-1].item())
        heads.eval()
        with torch.no_grad():
            measured = evaluate(heads)
        for h, lr in enumerate(heads.lrs):
            rows.append({"lr": lr, "epoch": epoch + 1,
                         "train_loss": float(total[h] / max(seen, 1)), **measured[h]})
        if state_path is not None and dist.is_main:
            from narrows.runs.files import atomic_torch_save

            atomic_torch_save(state_path, {"format": STATE_FORMAT, "stamp": stamp,
                                           "epoch": epoch + 1, "heads": heads.state_dict(),
                                           "optimizer": optimizer.state_dict(), "rows": rows})
    return rows


def _restore(heads: nn.Module, optimizer: torch.optim.Optimizer, state_path: str | Path | None,
             stamp: dict[str, Any], rows: list[dict[str, Any]]) -> int:
    """Epochs done according to ``state_path`` (loaded into the arguments), or 0."""
    if state_path is None or not Path(state_path).is_file():
        return 0
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved.get("format") != STATE_FORMAT or saved.get("stamp") != stamp:
            return 0
        heads.load_state_dict(saved["heads"])
        optimizer.load_state_dict(saved["optimizer"])
    except Exception:  # a damaged or foreign file: start over
        return 0
    rows.extend(saved["rows"])
    return int(saved["epoch"])


# --- the cached path -----------------------------------------------------------------------


def topk_hits(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> list[Tensor]:
    """Per k of ``ks``, the number of rows of ``logits`` ``[..., N, C]`` whose ``labels`` ``[N]``
    is among the ``min(k, C)`` highest logits (ties: the lower class first)."""
    order = torch.sort(-logits, dim=-1, stable=True).indices
    hit = order == labels[:, None]
    return [hit[..., : min(k, logits.shape[-1])].any(-1).sum(-1) for k in ks]


def accuracy_of(heads: nn.Module, features: Tensor, labels: Tensor, *, device: torch.device | str,
                chunk: int = 4096) -> list[tuple[float, float]]:
    """Per head of ``heads``, (top-1, top-5) on ``features`` ``[N, dim]`` against ``labels``
    (``chunk``: rows per forward); NaN for an empty set."""
    count = len(heads.lrs)  # type: ignore[arg-type]
    hits = torch.zeros(2, count, dtype=torch.long)
    for first in range(0, len(features), chunk):
        logits = heads(features[first: first + chunk].to(device)).cpu()
        top1, top5 = topk_hits(logits, labels[first: first + chunk])
        hits += torch.stack([top1, top5])
    n = len(features)
    return [(float(hits[0, h]) / n if n else math.nan, float(hits[1, h]) / n if n else math.nan)
            for h in range(count)]


def evaluator(test: Any, holdout: tuple[Tensor, Tensor] | None, device: torch.device | str
              ) -> Callable[[nn.Module], list[dict[str, float]]]:
    """A function of the heads giving, per head, ``test_top1``/``test_top5`` on ``test`` (a
    feature table) and ``holdout_top1`` on the ``holdout`` (features, labels) when given;
    ``device``: where the heads run."""
    test_features, test_labels = test.features.float(), test.labels.long()

    def evaluate(heads: nn.Module) -> list[dict[str, float]]:
        found = [{"test_top1": a, "test_top5": b}
                 for a, b in accuracy_of(heads, test_features, test_labels, device=device)]
        if holdout is not None:
            for row, (a, _) in zip(found, accuracy_of(heads, *holdout, device=device),
                                   strict=True):
                row["holdout_top1"] = a
        return found

    return evaluate


def _option(options: Any, name: str, default: Any) -> Any:
    return getattr(options, name, default)


def seed_of(options: Any, seed: int | None = None) -> int:
    """``seed`` when given, else the ``seed`` of ``options`` (a command's config has one), else
    0."""
    return int(seed if seed is not None else _option(options, "seed", 0))


def _options_dict(options: Any) -> dict[str, Any]:
    if is_dataclass(options) and not isinstance(options, type):
        return asdict(options)
    return dict(vars(options)) if hasattr(options, "__dict__") else {}


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """``(train rows, held-out rows)`` of ``n``: a seeded ``fraction`` is held out (at least one
    row, at most ``n - 1``)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive_seed(seed, HOLDOUT_STREAM)))
    held = min(max(1, round(n * fraction)), n - 1)
    return order[held:].sort().values, order[:held].sort().values


def train_heads(train: Any, test: Any, options: Any, *, state_path: str | Path | None = None,
                device: torch.device | str = "cpu", num_classes: int | None = None,
                seed: int | None = None, say: Callable[[str], None] | None = None
                ) -> LinearResult:
    """Linear probes on features already computed (the cached path; pure up to ``state_path``).

    ``train``/``test``: :class:`~narrows.ssl.backbones.FeatureTable`-like (``features``
    ``[N, dim]``, ``labels`` ``[N]``); ``options``: ``LinearOptions`` (``lr`` list, ``lr_min``,
    ``epochs``, ``batch_size``, ``momentum``, ``weight_decay``, ``holdout``); ``seed`` (heads'
    draw, order, holdout): default the options' ``seed`` when present, else 0. ``state_path``: resume file, rewritten after each epoch; ``num_classes``: the
    heads' outputs (default: 1 + the largest label).
    """
    started = time.perf_counter()
    seed = seed_of(options, seed)
    features, labels = train.features.float(), train.labels.long()
    if num_classes is None:
        num_classes = 1 + int(max(int(labels.max()),
                                  int(test.labels.max()) if len(test.labels) else 0))
    _check_options(options)
    held = _option(options, "holdout", 0.0)
    held_rows, holdout = None, None
    if held > 0:
        keep, held_rows = holdout_split(len(features), held, seed)
        holdout = (features[held_rows], labels[held_rows])
        features, labels = features[keep], labels[keep]
    batch = int(options.batch_size)
    heads = MultiHeadLinear(features.shape[1], num_classes, options.lr, seed=seed).to(device)
    optimizer = make_optimizer(heads, global_batch=batch, momentum=options.momentum,
                               weight_decay=options.weight_decay)

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(len(features), seed, epoch)
        for first in range(0, len(order), batch):
            rows = order[first: first + batch]
            yield features[rows], labels[rows]

    evaluate = evaluator(test, holdout, device)

    stamp = {"n_train": len(features), "n_test": len(test.features), "dim": features.shape[1],
             "classes": num_classes, "lrs": heads.lrs, "epochs": options.epochs,
             "batch_size": batch, "momentum": options.momentum,
             "weight_decay": options.weight_decay, "lr_min": options.lr_min, "seed": seed,
             "holdout": held, "path": "cached"}
    rows = fit_heads(heads, optimizer, epochs=options.epochs, lr_min=options.lr_min,
                     batches=batches, loss_fn=cross_entropy_per_head, evaluate=evaluate,
                     state_path=state_path, stamp=stamp, device=device, say=say)
    result = summarise(rows, options, feature=_spec_key(train), augment="none",
                       seconds=time.perf_counter() - started, backbone_passes=0, seed=seed)
    result.heads = heads.cpu()
    return result


def _spec_key(table: Any) -> str:
    spec = getattr(table, "spec", None)
    return str(getattr(spec, "key", spec)) if spec is not None else "features"


def _check_options(options: Any) -> None:
    if options.epochs < 1:
        raise UserError(f"the linear probe needs at least one epoch, not {options.epochs}",
                        "give --epochs >= 1")
    if not options.lr or any(lr <= 0 for lr in options.lr):
        raise UserError(f"linear probe learning rates must be positive, not {options.lr}",
                        "give --lr as positive numbers, e.g. --lr 0.001 0.01 0.1")
    if not 0 <= _option(options, "holdout", 0.0) < 1:
        raise UserError(f"holdout {options.holdout} is not a fraction in [0, 1)",
                        "give --holdout 0 (select on test, as DINO) or e.g. 0.1")


def summarise(rows: list[dict[str, Any]], options: Any, *, feature: str, augment: str,
              seconds: float, backbone_passes: int, seed: int = 0) -> LinearResult:
    """The :class:`LinearResult` of per-(lr, epoch) ``rows`` (``options``: the probe's options;
    ``feature``, ``augment``, ``seconds``, ``backbone_passes``, ``seed``: stored as given)."""
    final: dict[str, dict[str, Any]] = {}
    lrs = [float(lr) for lr in options.lr]
    for lr in lrs:
        mine = [row for row in rows if row["lr"] == lr]
        if not mine:
            continue
        best = max(mine, key=lambda row: (row["test_top1"], -row["epoch"]))
        final[str(lr)] = {"top1": mine[-1]["test_top1"], "top5": mine[-1]["test_top5"],
                          "best_top1": best["test_top1"], "best_epoch": best["epoch"]}
        if "holdout_top1" in mine[-1]:
            final[str(lr)]["holdout_top1"] = mine[-1]["holdout_top1"]
    selected_on = "holdout" if _option(options, "holdout", 0.0) > 0 else "test"
    metric = "holdout_top1" if selected_on == "holdout" else "top1"
    best_lr = max(lrs, key=lambda lr: final.get(str(lr), {}).get(metric, -math.inf)) \
        if final else lrs[0]
    return LinearResult(
        model="features", data="", layout="", feature=feature, augment=augment, lrs=lrs,
        epochs=int(options.epochs), batch_size=int(options.batch_size), rows=rows, final=final,
        best_lr=best_lr, best_top1=final.get(str(best_lr), {}).get("top1", math.nan),
        selected_on=selected_on, seconds=seconds, backbone_passes=backbone_passes,
        provenance=_provenance(options, seed))


def _provenance(options: Any, seed: int, **extra: Any) -> dict[str, Any]:
    from narrows.runs.results import provenance

    return provenance(seed=seed, options=_options_dict(options),
                      **extra)


# --- through a backbone ------------------------------------------------------------------


def image_features(backbone: Any, spec: Any) -> Callable[[Tensor], Tensor]:
    """``images in [0, 1] -> [B, dim]``: ``spec``'s features of ``backbone`` (an
    :class:`~narrows.ssl.backbones.EvalBackbone`) exactly as
    :func:`~narrows.ssl.backbones.backbone_features` computes them (resized to the input size,
    normalised), under ``no_grad``."""
    from narrows.models.features import feature_function
    from narrows.training import Normalizer

    features = feature_function(backbone.vit, spec)
    normalizer = Normalizer(backbone.mean, backbone.std)
    size = backbone.input_size

    @torch.no_grad()
    def run(images: Tensor) -> Tensor:
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False)
        return features(normalizer(images)).float()

    return run


def augmented_train(data: Any, augment: str, backbone: Any) -> Any:
    """The training split served with ``augment`` (``none``; ``dino``: the data's
    ``resized-crop-flip``; ``udi``: that plus RandAugment ``rand-m9-mstd0.5-inc1`` and random
    erasing 0.25 in ``backbone``'s normalisation, from :mod:`narrows.training.recipes`)."""
    if augment == "none":
        return data.split("train", "none")
    if augment not in ("dino", "udi"):
        raise UserError(f"unknown linear-probe augmentation {augment!r}",
                        "give --augment none, dino or udi")
    dataset = data.split("train", "resized-crop-flip")
    if augment == "udi":
        from types import SimpleNamespace

        from narrows.training.recipes import Augmented, train_transform

        extra = train_transform(SimpleNamespace(randaugment="rand-m9-mstd0.5-inc1",
                                                random_erasing=0.25), backbone.mean, backbone.std)
        dataset = Augmented(dataset, extra) if extra is not None else dataset
    return dataset


def _image_batches(dataset: Any, rows: Tensor, run: Callable[[Tensor], Tensor], *, batch: int,
                   workers: int, device: torch.device | str, rng_seed: int | None
                   ) -> Iterator[tuple[Tensor, Tensor]]:
    """``(features, labels)`` of ``dataset[rows]`` in that order, ``batch`` images at a time;
    with ``rng_seed`` the augmentations draw from torch's, Python's and numpy's RNGs seeded so
    (all restored after); ``batch``, ``workers``: of the loader; ``run``: images -> features."""
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch, shuffle=False,
                        num_workers=workers)
    import random

    import numpy as np

    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        if rng_seed is not None:  # torchvision draws from torch, timm's RandAugment from both
            torch.manual_seed(rng_seed)
            random.seed(rng_seed)
            np.random.seed(rng_seed % 2**32)
        try:
            for images, labels in loader:
                yield run(images.to(device)), torch.as_tensor(labels)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def _through_backbone(backbone: Any, data: Any, options: Any, spec: Any, test: Any, *,
                      state_path: Path | None, device: torch.device | str, dist: Distributed,
                      workers: int, seed: int, say: Callable[[str], None] | None
                      ) -> LinearResult:
    """Heads trained on features the frozen backbone computes every epoch (augmentation
    ``options.augment``, or none with ``through_backbone``)."""
    started = time.perf_counter()
    augment = options.augment
    dataset = augmented_train(data, augment, backbone)
    run = image_features(backbone, spec)
    backbone.vit.to(device).eval()
    n = len(dataset)
    keep = torch.arange(n)
    held = _option(options, "holdout", 0.0)
    holdout = None
    if held > 0:
        keep, held_rows = holdout_split(n, held, seed)
        pieces = list(_image_batches(data.split("train", "none"), held_rows, run,
                                     batch=options.batch_size, workers=workers, device=device,
                                     rng_seed=None))
        holdout = (torch.cat([f.cpu() for f, _ in pieces]), torch.cat([y for _, y in pieces]))
    heads = MultiHeadLinear(test.dim, data.info.num_classes, options.lr, seed=seed).to(device)
    batch = int(options.batch_size)
    optimizer = make_optimizer(heads, global_batch=batch * dist.world_size,
                               momentum=options.momentum, weight_decay=options.weight_decay)
    model: nn.Module = heads
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(heads)

    passes = []

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        passes.append(epoch)
        order = keep[epoch_order(len(keep), seed, epoch)]
        if dist.enabled:  # equal shards (wrapped round, as DistributedSampler): equal steps
            pad = -len(order) % dist.world_size
            order = torch.cat([order, order[:pad]])[dist.rank::dist.world_size]
        rng = None if augment == "none" else derive_seed(seed, epoch, dist.rank, 1)
        return _image_batches(dataset, order, run, batch=batch, workers=workers, device=device,
                              rng_seed=rng)

    evaluate = evaluator(test, holdout, device)

    stamp = {"n_train": len(keep), "n_test": len(test.features), "dim": test.dim,
             "classes": data.info.num_classes, "lrs": heads.lrs, "epochs": options.epochs,
             "batch_size": batch, "world": dist.world_size, "momentum": options.momentum,
             "weight_decay": options.weight_decay, "lr_min": options.lr_min, "seed": seed,
             "holdout": held, "path": f"backbone-{augment}", "backbone": backbone.id,
             "feature": spec.key, "data": data.info.spec}
    rows = fit_heads(heads, optimizer, epochs=options.epochs, lr_min=options.lr_min,
                     batches=batches, loss_fn=cross_entropy_per_head, evaluate=evaluate,
                     state_path=state_path, stamp=stamp, model=model, device=device, dist=dist,
                     say=say)
    result = summarise(rows, options, feature=spec.key, augment=augment,
                       seconds=time.perf_counter() - started, backbone_passes=len(passes),
                       seed=seed)
    result.heads = heads.cpu()
    return result


def default_feature(vit: nn.Module) -> str:
    """DINO's linear-probe feature for ``vit``: cls of the last 4 blocks (of every block when
    it has fewer), the average patch token of a ViT without a class token, the pooled
    pre-logit features of any other model."""
    from narrows.models.features import available_parts

    parts = available_parts(vit)
    if "cls" in parts:
        return f"cls@{min(4, len(vit.blocks))}"
    return "avgpool" if "avgpool" in parts else "pre-logits"


def linear_probe(backbone: Any, data: Any, options: Any, *, run: RunDir | None = None,
                 cache: str | Path | None = None, device: torch.device | str = "cpu",
                 dist: Distributed = Distributed(), workers: int = 0, batch_size: int = 256,
                 seed: int | None = None, progress: bool = False,
                 say: Callable[[str], None] | None = print) -> LinearResult:
    """Linear probes of ``backbone`` (an :class:`~narrows.ssl.backbones.EvalBackbone`) on
    ``data`` (a :class:`~narrows.data.DataBundle` or a spec) with ``options``
    (``LinearOptions``).

    ``augment == "none"`` (and not ``through_backbone``): one pass computes the features of
    both splits (kept in ``cache`` when given) and the heads train on them; otherwise the
    backbone runs on the (augmented) training images every epoch. The test features always
    come from one pass. ``run``: where ``linear-state.pt`` is kept, so that a rerun continues;
    ``batch_size``/``workers``: of the feature passes (the heads' batch is the options');
    ``seed``: heads' draw, order and augmentation (default: the options' ``seed``, else 0).
    """
    from narrows.models.features import check_spec
    from narrows.ssl.backbones import backbone_features, eval_data

    seed = seed_of(options, seed)
    data = eval_data(backbone, data)
    spec = check_spec(backbone.vit, options.feature or default_feature(backbone.vit))
    state_path = run.file(STATE_FILE) if run is not None else None
    if state_path is not None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
    passes = {"cache": cache, "device": device, "batch_size": batch_size, "workers": workers,
              "dist": dist, "progress": progress, "say": say}
    test = backbone_features(backbone, data, "test", spec, **passes)[spec.key]
    if options.augment == "none" and not options.through_backbone:
        train = backbone_features(backbone, data, "train", spec, **passes)[spec.key]
        result = train_heads(train, test, options, state_path=state_path, device=device,
                             num_classes=data.info.num_classes, seed=seed, say=say)
        result.backbone_passes = 0 if train.from_cache else 1
    else:
        result = _through_backbone(backbone, data, options, spec, test, state_path=state_path,
                                   device=device, dist=dist, workers=workers, seed=seed,
                                   say=say)
    origin = _provenance(options, seed, model=backbone.id, data=data.info.spec,
                         compute={"device": str(device), "seconds": result.seconds,
                                  "backbone_passes": result.backbone_passes,
                                  "world_size": dist.world_size,
                                  "backbone": backbone.provenance()})
    return with_subject(result, model=backbone.id, data=data.info.spec, layout=backbone.layout,
                        provenance=origin)


# --- the result ----------------------------------------------------------------------------


@dataclass
class LinearResult(JsonResult):
    """What a linear probe measured.

    ``rows``: one per (lr, epoch) with ``train_loss``, ``test_top1``, ``test_top5`` (and
    ``holdout_top1`` with a holdout); ``final`` maps ``str(lr)`` to the last epoch's ``top1``,
    ``top5`` and the best epoch's ``best_top1``/``best_epoch``; ``best_lr`` is the lr with the
    highest final top-1 on ``selected_on`` (``test`` as DINO, or ``holdout``), ``best_top1`` its
    test top-1. ``backbone_passes``: passes of the backbone over the training images (1 on the
    cached path, ``epochs`` through the backbone). ``heads`` (not saved): the trained heads.
    """

    model: str
    data: str
    layout: str
    feature: str
    augment: str
    lrs: list[float]
    epochs: int
    batch_size: int
    rows: list[dict[str, Any]]
    final: dict[str, dict[str, Any]]
    best_lr: float
    best_top1: float
    selected_on: str
    seconds: float
    backbone_passes: int
    provenance: dict[str, Any] = field(default_factory=dict)
    heads: MultiHeadLinear | None = field(default=None, repr=False, compare=False)

    KIND, VERSION, WHAT = FORMAT_KIND, FORMAT_VERSION, "linear probe result"
    FIX = "point at the linear.json of a 'narrows ssl linear' run"
    SAVED = ("model", "data", "layout", "feature", "augment", "lrs", "epochs", "batch_size",
             "rows", "final", "best_lr", "best_top1", "selected_on", "seconds", "backbone_passes")

    def headline(self) -> dict[str, float]:
        """Top-1 of the selected head, its lr, and top-1 per lr (results.json)."""
        return {"best_top1": self.best_top1, "best_lr": self.best_lr,
                **{f"lr {float(lr):g}/top1": v["top1"] for lr, v in self.final.items()}}

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat record per (lr, epoch)."""
        return [{"model": self.model, "data": self.data, "feature": self.feature,
                 "augment": self.augment, **row} for row in self.rows]

    def summary(self) -> str:
        """``linear probe cls@4 on shapes (augment none, 100 epochs): top-1 61.0% at lr 0.01 …``."""
        sweep = ", ".join(f"{float(lr):g} {100 * v['top1']:.1f}%" for lr, v in self.final.items())
        return (f"linear probe {self.feature} on {self.data or 'features'} (augment "
                f"{self.augment}, {self.epochs} epochs): top-1 {100 * self.best_top1:.1f}% at lr "
                f"{self.best_lr:g} (selected on {self.selected_on}; per lr {sweep})")

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Test top-1 per epoch, one line per lr; returns ``(fig, ax)``."""
        from narrows.plotting import axes

        fig, ax = axes(ax)
        for lr in self.lrs:
            mine = [row for row in self.rows if row["lr"] == lr]
            ax.plot([row["epoch"] for row in mine], [100 * row["test_top1"] for row in mine],
                    marker=".", label=f"lr {lr:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"linear probe {self.feature} on {self.data or 'features'}", fontsize=9)
        ax.legend(fontsize=7)
        return fig, ax


def with_subject(result: LinearResult, *, model: str, data: str, layout: str,
                 provenance: dict[str, Any]) -> LinearResult:
    """``result`` labelled with the backbone (``model`` id, ``layout``), ``data`` spec and
    ``provenance``."""
    return replace(result, model=model, data=data, layout=layout, provenance=provenance,
                   heads=result.heads)
