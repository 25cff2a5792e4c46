"""Probes beyond one label per image: per-patch segmentation and multi-label classification.

Both read frozen features of a ViT on the ``shapes`` data set and train linear heads with the
linear probe's machinery (:mod:`narrows.ssl.linear`: one head per learning rate from the same
draw, SGD with momentum, lr × batch / 256, cosine per epoch).

*Patch probe*: every normed last-block patch token is classified into background or one of the
``C`` classes; the target of a patch is the majority label of its ``P×P`` pixels
(:func:`patch_targets`). The headline is the mIoU on the patch grid; the pixel mIoU compares the
logits upsampled bilinearly to the image with the per-pixel class map. Background counts as a
class. *Multi-label probe*: per feature spec (``cls``, ``cls+``, ``cls|cls+``), binary
cross-entropy on which classes appear in the image; exact-match accuracy (all labels right at
0.5), per-label accuracy and macro average precision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.runs.results import JsonResult
from narrows.ssl.linear import (
    MultiHeadLinear,
    cross_entropy_per_head,
    epoch_order,
    fit_heads,
    make_optimizer,
    seed_of,
)

if TYPE_CHECKING:
    from narrows.runs import RunDir

PATCH_KIND, MULTILABEL_KIND, FORMAT_VERSION = "ssl.patch_probe", "ssl.multilabel", 1
PATCH_STATE, MULTILABEL_STATE = "patch-probe-state.pt", "multilabel-state-{}.pt"


# --- targets and metrics -------------------------------------------------------------------


def patch_targets(class_masks: Tensor, patch: int) -> Tensor:
    """The majority label of each ``patch×patch`` cell of ``class_masks`` ``[N, H, W]`` (ints
    >= 0), ``[N, H/patch, W/patch]``; a tie goes to the lower label."""
    n, height, width = class_masks.shape
    if height % patch or width % patch:
        raise UserError(f"patch size {patch} does not divide the {height}×{width} masks",
                        "use an image size that is a multiple of the patch size")
    gh, gw = height // patch, width // patch
    cells = class_masks.long().reshape(n, gh, patch, gw, patch).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(n, gh, gw, patch * patch)
    labels = int(class_masks.max()) + 1 if class_masks.numel() else 1
    counts = torch.zeros(n, gh, gw, labels, dtype=torch.long)
    counts.scatter_add_(-1, cells, torch.ones_like(cells))
    return counts.argmax(-1)  # the first of equal maxima: the lower label


def confusion_matrix(predicted: Tensor, target: Tensor, labels: int) -> Tensor:
    """``[labels, labels]`` counts of (``target``, ``predicted``) pairs: row = true label,
    column = predicted."""
    index = target.reshape(-1).long() * labels + predicted.reshape(-1).long()
    return torch.bincount(index, minlength=labels * labels).reshape(labels, labels)


def confusion_miou(confusion: Tensor) -> tuple[float, list[float]]:
    """Mean IoU of a confusion matrix (row = true, column = predicted) and each label's IoU
    ``TP / (TP + FP + FN)``; labels that are neither present nor predicted are NaN in the list
    and left out of the mean."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    seen = union > 0
    mean = float(iou[seen].mean()) if seen.any() else math.nan
    return mean, [float(v) for v in iou]


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Average precision of ranking ``scores`` ``[N]`` against bool ``positive``: the sum over
    distinct thresholds of (recall step × precision), as scikit-learn's
    ``average_precision_score``; NaN without positives."""
    total = int(positive.sum())
    if total == 0:
        return math.nan
    order = torch.sort(scores.double(), descending=True, stable=True)
    hits = positive[order.indices].double().cumsum(0)
    values = order.values
    last = torch.ones(len(values), dtype=torch.bool)  # last row of each run of equal scores
    last[:-1] = values[1:] != values[:-1]
    tp = hits[last]
    precision = tp / (torch.nonzero(last).squeeze(1) + 1).double()
    recall = tp / total
    steps = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((steps * precision).sum())


def multilabel_scores(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Exact-match accuracy (every label right at probability 0.5), per-label accuracy and
    macro average precision (over labels with a positive) of ``logits`` ``[N, C]`` against bool
    ``targets`` ``[N, C]``."""
    predicted = logits > 0
    truth = targets.bool()
    right = predicted == truth
    aps = [average_precision(logits[:, c], truth[:, c]) for c in range(truth.shape[1])]
    aps = [ap for ap in aps if not math.isnan(ap)]
    n = len(logits)
    return {"exact_match": float(right.all(1).float().mean()) if n else math.nan,
            "label_accuracy": float(right.float().mean()) if n else math.nan,
            "map": sum(aps) / len(aps) if aps else math.nan}


# --- training on features ------------------------------------------------------------------


def _batches(inputs: Tensor, targets: Tensor, batch: int, seed: int
             ) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(len(inputs), seed, epoch)
        for first in range(0, len(order), batch):
            rows = order[first: first + batch]
            yield inputs[rows], targets[rows]
    return batches


def _check(options: Any) -> None:
    if options.epochs < 1 or not options.lr or any(lr <= 0 for lr in options.lr):
        raise UserError(f"a probe needs epochs >= 1 and positive learning rates, not epochs "
                        f"{options.epochs}, lr {options.lr}", "give --epochs >= 1 and --lr > 0")


def patch_logits(heads: nn.Module, tokens: Tensor, grid: tuple[int, int], *,
                 device: torch.device | str, chunk: int = 256) -> Iterator[Tensor]:
    """Per chunk of images, the heads' logits ``[H, n, K, gh, gw]`` of ``tokens`` ``[N, T, D]``
    (``grid``: ``(gh, gw)``, ``gh × gw == T``; ``chunk``: images per forward)."""
    for first in range(0, len(tokens), chunk):
        logits = heads(tokens[first: first + chunk].to(device).float())  # [H, n, T, K]
        h, n, _, k = logits.shape
        yield logits.reshape(h, n, *grid, k).permute(0, 1, 4, 2, 3).cpu()


def train_patch_heads(train_tokens: Tensor, train_masks: Tensor, test_tokens: Tensor,
                      test_masks: Tensor, options: Any, *, patch: int, labels: int,
                      seed: int = 0, state_path: str | Path | None = None,
                      device: torch.device | str = "cpu",
                      say: Callable[[str], None] | None = None,
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], MultiHeadLinear]:
    """Per-patch linear heads on patch tokens ``train_tokens``/``test_tokens`` ``[N, gh·gw, D]``
    (row-major grid) with targets
    from the pixel class maps ``train_masks``/``test_masks`` ``[N, H, W]`` (``patch``: pixels
    per patch side; ``labels``: classes including background 0). ``options``:
    ``PatchProbeOptions`` (``lr``, ``epochs``, ``batch_size`` in images); ``seed``: init and
    order; ``state_path``: resume file.

    Returns ``(per-lr rows, per-(lr, epoch) rows, heads)``: final patch-grid ``miou``,
    ``pixel_miou`` and ``per_class_iou`` per lr; patch mIoU after each epoch.
    """
    _check(options)
    height, width = train_masks.shape[-2:]
    grid = (height // patch, width // patch)
    if train_tokens.shape[1] != grid[0] * grid[1]:
        raise UserError(f"{train_tokens.shape[1]} patch tokens do not make a {grid[0]}×{grid[1]} "
                        "grid", "feed the ViT images of the data's size")
    train_targets = patch_targets(train_masks, patch).reshape(len(train_masks), -1)
    test_targets = patch_targets(test_masks, patch)
    heads = MultiHeadLinear(train_tokens.shape[-1], labels, options.lr, seed=seed).to(device)
    batch = int(options.batch_size)
    optimizer = make_optimizer(heads, global_batch=batch, momentum=0.9)

    def confusions(model: nn.Module, pixels: bool) -> list[Tensor]:
        found = [torch.zeros(labels, labels, dtype=torch.long) for _ in heads.lrs]
        first = 0
        for logits in patch_logits(model, test_tokens, grid, device=device):
            n = logits.shape[1]
            for h in range(len(found)):
                if pixels:
                    up = F.interpolate(logits[h], size=(height, width), mode="bilinear",
                                       align_corners=False)
                    found[h] += confusion_matrix(up.argmax(1), test_masks[first: first + n],
                                                 labels)
                else:
                    found[h] += confusion_matrix(logits[h].argmax(1),
                                                 test_targets[first: first + n], labels)
            first += n
        return found

    def evaluate(model: nn.Module) -> list[dict[str, float]]:
        return [{"miou": confusion_miou(c)[0]} for c in confusions(model, False)]

    stamp = {"n_train": len(train_tokens), "n_test": len(test_tokens),
             "dim": train_tokens.shape[-1], "labels": labels, "lrs": heads.lrs,
             "epochs": options.epochs, "batch_size": batch, "seed": seed, "patch": patch}
    history = fit_heads(heads, optimizer, epochs=options.epochs, lr_min=0.0,
                        batches=_batches(train_tokens, train_targets, batch, seed),
                        loss_fn=cross_entropy_per_head, evaluate=evaluate, state_path=state_path,
                        stamp=stamp, device=device, say=say, name="patch probe")
    heads.eval()
    with torch.no_grad():
        grid_conf, pixel_conf = confusions(heads, False), confusions(heads, True)
    rows = []
    for h, lr in enumerate(heads.lrs):
        miou, per_class = confusion_miou(grid_conf[h])
        rows.append({"lr": lr, "miou": miou, "pixel_miou": confusion_miou(pixel_conf[h])[0],
                     "per_class_iou": per_class,
                     "train_loss": [r for r in history if r["lr"] == lr][-1]["train_loss"]})
    return rows, history, heads.cpu()


def train_multilabel_heads(train: Tensor, train_targets: Tensor, test: Tensor,
                           test_targets: Tensor, options: Any, *, seed: int = 0,
                           state_path: str | Path | None = None,
                           device: torch.device | str = "cpu",
                           say: Callable[[str], None] | None = None,
                           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], MultiHeadLinear]:
    """Multi-label linear heads on features ``train``/``test`` ``[N, D]`` against bool ``[N, C]``
    ``train_targets``/``test_targets`` with binary cross-entropy (``options``: ``MultiLabelOptions``: ``lr``, ``epochs``, and
    ``batch_size``; ``seed``: init and order; ``state_path``: resume
    file). Returns ``(per-lr final rows, per-(lr, epoch) rows, heads)``."""
    _check(options)
    batch = int(options.batch_size)
    heads = MultiHeadLinear(train.shape[1], train_targets.shape[1], options.lr,
                            seed=seed).to(device)
    optimizer = make_optimizer(heads, global_batch=batch, momentum=0.9)

    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        return torch.stack([F.binary_cross_entropy_with_logits(head, targets.float())
                            for head in logits])

    def evaluate(model: nn.Module) -> list[dict[str, float]]:
        logits = torch.cat([model(test[i: i + 4096].to(device).float()).cpu()
                            for i in range(0, len(test), 4096)], dim=1)
        return [multilabel_scores(head, test_targets) for head in logits]

    stamp = {"n_train": len(train), "n_test": len(test), "dim": train.shape[1],
             "labels": train_targets.shape[1], "lrs": heads.lrs, "epochs": options.epochs,
             "batch_size": batch, "seed": seed}
    history = fit_heads(heads, optimizer, epochs=options.epochs, lr_min=0.0,
                        batches=_batches(train.float(), train_targets.bool(), batch, seed),
                        loss_fn=loss_fn, evaluate=evaluate, state_path=state_path, stamp=stamp,
                        device=device, say=say, name="multi-label probe")
    final = [{k: v for k, v in row.items() if k != "epoch"}
             for row in history[-len(heads.lrs):]]
    return final, history, heads.cpu()


def best_row(rows: Sequence[dict[str, Any]], metric: str, tie: str | None = None
             ) -> dict[str, Any]:
    """The one of ``rows`` with the highest ``metric`` (then ``tie``; then the first); NaN counts
    lowest."""
    def key(row: dict[str, Any]) -> tuple[float, float]:
        def value(name: str | None) -> float:
            v = row.get(name, math.nan) if name else 0.0
            return -math.inf if v is None or math.isnan(v) else v
        return value(metric), value(tie)
    return max(rows, key=key)


# --- results -------------------------------------------------------------------------------


@dataclass
class PatchProbeResult(JsonResult):
    """What the patch probe measured: ``miou`` (patch grid, majority targets; the headline),
    ``pixel_miou`` and ``per_class_iou`` (background first, NaN where a label never occurs) of
    the head at ``best_lr`` (highest grid mIoU on test); ``rows`` per lr (``lr``, ``miou``,
    ``pixel_miou``, ``train_loss``), ``history`` per (lr, epoch)."""

    model: str
    data: str
    layout: str
    lrs: list[float]
    epochs: int
    miou: float
    pixel_miou: float
    per_class_iou: list[float]
    class_names: list[str]
    best_lr: float
    rows: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)

    KIND, WHAT, FIX = PATCH_KIND, "patch probe result", "point at a 'narrows ssl patch-probe' JSON"
    SAVED = ("model", "data", "layout", "lrs", "epochs", "miou", "pixel_miou", "per_class_iou",
             "class_names", "best_lr", "rows", "history", "seconds")

    def headline(self) -> dict[str, float]:
        """Grid and pixel mIoU of the selected head, and its lr (results.json)."""
        return {"miou": self.miou, "pixel_miou": self.pixel_miou, "best_lr": self.best_lr}

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat record per learning rate."""
        return [{"model": self.model, "data": self.data,
                 **{k: v for k, v in row.items() if k != "per_class_iou"}} for row in self.rows]

    def summary(self) -> str:
        """``patch probe on shapes: mIoU 71.2% (pixel 68.0%) at lr 0.01, …``."""
        worst = min(((v, n) for v, n in zip(self.per_class_iou, self.class_names, strict=True)
                     if not math.isnan(v)), default=(math.nan, "-"))
        return (f"patch probe {self.model} on {self.data}: mIoU {100 * self.miou:.1f}% (pixel "
                f"{100 * self.pixel_miou:.1f}%) at lr {self.best_lr:g}, {self.epochs} epochs; "
                f"lowest IoU {worst[1]} {100 * worst[0]:.1f}%")

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """IoU per class (bars); returns ``(fig, ax)``."""
        from narrows.plotting import axes

        fig, ax = axes(ax)
        values = [0.0 if math.isnan(v) else 100 * v for v in self.per_class_iou]
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), self.class_names, rotation=30, fontsize=7)
        ax.set_ylabel("IoU (%)")
        ax.set_title(f"patch probe: mIoU {100 * self.miou:.1f}% ({self.data})", fontsize=9)
        return fig, ax



@dataclass
class MultiLabelResult(JsonResult):
    """What the multi-label probes measured: ``rows`` per feature spec (``feature``,
    ``exact_match``, ``label_accuracy``, ``map``, ``best_lr``: the lr with the highest test
    exact match, then mAP); ``sweep`` per (feature, lr) final values, ``history`` per
    (feature, lr, epoch)."""

    model: str
    data: str
    layout: str
    lrs: list[float]
    epochs: int
    rows: list[dict[str, Any]]
    sweep: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)

    KIND, WHAT, FIX = MULTILABEL_KIND, "multi-label result", "point at a 'narrows ssl multilabel' JSON"
    SAVED = ("model", "data", "layout", "lrs", "epochs", "rows", "sweep", "history", "seconds")

    def headline(self) -> dict[str, float]:
        """Exact match, label accuracy and mAP per feature, ``"<feature>/map"`` (results.json)."""
        return {f"{row['feature']}/{name}": row[name] for row in self.rows
                for name in ("exact_match", "label_accuracy", "map")}

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat record per feature spec."""
        return [{"model": self.model, "data": self.data, **row} for row in self.rows]

    def summary(self) -> str:
        """``multi-label on shapes: cls exact 41.0% (mAP 80.1%), cls+ …``."""
        parts = ", ".join(f"{row['feature']} exact {100 * row['exact_match']:.1f}% (mAP "
                          f"{100 * row['map']:.1f}%)" for row in self.rows)
        return f"multi-label probe {self.model} on {self.data}: {parts}"

    def plot(self, ax: Any = None) -> tuple[Any, Any]:
        """Exact match and mAP per feature (bars); returns ``(fig, ax)``."""
        from narrows.plotting import axes

        fig, ax = axes(ax)
        x = range(len(self.rows))
        ax.bar([i - 0.2 for i in x], [100 * r["exact_match"] for r in self.rows], width=0.4,
               label="exact match")
        ax.bar([i + 0.2 for i in x], [100 * r["map"] for r in self.rows], width=0.4,
               label="mAP")
        ax.set_xticks(list(x), [r["feature"] for r in self.rows])
        ax.set_ylabel("%")
        ax.set_title(f"multi-label probe ({self.data})", fontsize=9)
        ax.legend(fontsize=7)
        return fig, ax






# --- orchestrators -------------------------------------------------------------------------


def _shapes_splits(data: Any, backbone: Any, what: str) -> tuple[Any, Any, Any]:
    """``(bundle, train split, test split)`` of a shapes data set; a :class:`UserError` for
    other data."""
    from narrows.ssl.backbones import eval_data

    data = eval_data(backbone, data)
    train = data.split("train", "none")
    if data.info.name != "shapes" or not hasattr(train, "class_masks"):
        raise UserError(f"the {what} needs per-pixel classes, which {data.info.spec} lacks",
                        "evaluate on the shapes data set, e.g. --data "
                        "shapes:classes=4,size=32,objects=2,rmin=10,rmax=20")
    return data, train, data.split("test", "none")


def _masks_at(masks: Tensor, size: int) -> Tensor:
    """Class maps ``[N, H, W]`` at the ViT's input side ``size`` (nearest neighbour)."""
    if masks.shape[-1] == size and masks.shape[-2] == size:
        return masks
    return F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def _state(run: RunDir | None, name: str) -> Path | None:
    if run is None:
        return None
    run.path.mkdir(parents=True, exist_ok=True)
    return run.file(name)


def _origin(backbone: Any, data: Any, options: Any, seed: int, **compute: Any
            ) -> dict[str, Any]:
    from narrows.ssl.linear import _provenance

    return _provenance(options, seed, model=backbone.id, data=data.info.spec,
                       compute={**compute, "backbone": backbone.provenance()})


def patch_probe(backbone: Any, data: Any, options: Any, *, run: RunDir | None = None,
                cache: str | Path | None = None, device: torch.device | str = "cpu",
                batch_size: int = 256, workers: int = 0, seed: int | None = None,
                progress: bool = False, say: Callable[[str], None] | None = print
                ) -> PatchProbeResult:
    """Per-patch linear probes of ``backbone`` (an :class:`~narrows.ssl.backbones.EvalBackbone`)
    on ``data`` (a shapes :class:`~narrows.data.DataBundle` or spec) with ``options``
    (``PatchProbeOptions``). ``seed`` (heads' draw and order): default the options' ``seed``
    when present, else 0.

    The normed last-block patch tokens of both splits come from one pass (kept in ``cache``
    when given); class maps are resized (nearest) to the ViT's input side when the data's
    differs. ``run``: where the resume state is kept; ``batch_size``/``workers``: of the
    feature pass.
    """
    from narrows.ssl.backbones import backbone_features

    started = time.perf_counter()
    data, train_split, test_split = _shapes_splits(data, backbone, "patch probe")
    passes = {"cache": cache, "device": device, "batch_size": batch_size, "workers": workers,
              "progress": progress, "say": say, "patches": True}
    train = backbone_features(backbone, data, "train", [], **passes)["patches"]
    test = backbone_features(backbone, data, "test", [], **passes)["patches"]
    size, labels = backbone.input_size, data.info.num_classes + 1
    seed = seed_of(options, seed)
    rows, history, _ = train_patch_heads(
        train.features, _masks_at(train_split.class_masks, size), test.features,
        _masks_at(test_split.class_masks, size), options, patch=backbone.patch_size,
        labels=labels, seed=seed, state_path=_state(run, PATCH_STATE), device=device, say=say)
    best = best_row(rows, "miou")
    seconds = time.perf_counter() - started
    return PatchProbeResult(
        model=backbone.id, data=data.info.spec, layout=backbone.layout,
        lrs=[float(lr) for lr in options.lr], epochs=int(options.epochs), miou=best["miou"],
        pixel_miou=best["pixel_miou"], per_class_iou=best["per_class_iou"],
        class_names=["background", *data.info.class_names], best_lr=best["lr"], rows=rows,
        history=history, seconds=seconds,
        provenance=_origin(backbone, data, options, seed, device=str(device), seconds=seconds,
                           from_cache=bool(train.from_cache and test.from_cache)))


def multilabel_probe(backbone: Any, data: Any, options: Any, *, run: RunDir | None = None,
                     cache: str | Path | None = None, device: torch.device | str = "cpu",
                     batch_size: int = 256, workers: int = 0, seed: int | None = None,
                     progress: bool = False, say: Callable[[str], None] | None = print
                     ) -> MultiLabelResult:
    """Multi-label linear probes of ``backbone`` (an
    :class:`~narrows.ssl.backbones.EvalBackbone`) on ``data`` (shapes with ``objects >= 2``, a
    bundle or spec), one per feature spec of ``options`` (``MultiLabelOptions``; specs with a
    part the backbone lacks, e.g. ``cls+`` of a 1-token ViT, are dropped with a note).

    Features of all specs come from one pass per split (kept in ``cache`` when given).
    ``run``: where the resume states are kept; ``batch_size``/``workers``: of the feature pass;
    ``seed``: as for :func:`patch_probe`.
    """
    from narrows.data.shapes import parse_options
    from narrows.models.features import FeatureSpec, usable_features
    from narrows.ssl.backbones import backbone_features

    started = time.perf_counter()
    data, train_split, test_split = _shapes_splits(data, backbone, "multi-label probe")
    objects = parse_options(data.info.spec.partition(":")[2])["objects"]
    if objects < 2:
        raise UserError(f"{data.info.spec} has one object per image, so one label each",
                        "give the shapes data set objects >= 2, e.g. "
                        "shapes:classes=4,size=32,objects=2,rmin=10,rmax=20")
    specs = [FeatureSpec.parse(text)
             for text in usable_features(backbone.vit, list(options.features), say)]
    passes = {"cache": cache, "device": device, "batch_size": batch_size, "workers": workers,
              "progress": progress, "say": say}
    train = backbone_features(backbone, data, "train", specs, **passes)
    test = backbone_features(backbone, data, "test", specs, **passes)
    seed = seed_of(options, seed)
    rows, sweep, history = [], [], []
    for spec in specs:
        name = "".join(c if c.isalnum() else "_" for c in spec.key)
        final, curve, _ = train_multilabel_heads(
            train[spec.key].features, train_split.multilabel_targets, test[spec.key].features,
            test_split.multilabel_targets, options, seed=seed,
            state_path=_state(run, MULTILABEL_STATE.format(name)), device=device, say=say)
        best = best_row(final, "exact_match", "map")
        rows.append({"feature": spec.key, "exact_match": best["exact_match"],
                     "label_accuracy": best["label_accuracy"], "map": best["map"],
                     "best_lr": best["lr"]})
        sweep += [{"feature": spec.key, **row} for row in final]
        history += [{"feature": spec.key, **row} for row in curve]
    seconds = time.perf_counter() - started
    return MultiLabelResult(
        model=backbone.id, data=data.info.spec, layout=backbone.layout,
        lrs=[float(lr) for lr in options.lr], epochs=int(options.epochs), rows=rows,
        sweep=sweep, history=history, seconds=seconds,
        provenance=_origin(backbone, data, options, seed, device=str(device), seconds=seconds))
