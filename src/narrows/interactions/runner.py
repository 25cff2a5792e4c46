"""Running the estimator over a data set: selection, cost estimate, resume, rank sharding.

Each image's Δv is written to ``images/<id>.npz`` as soon as it is finished; a rerun skips the
images already there. Under torchrun, rank r takes every world-th selected image and rank 0
merges them in selection order. Because an image's pairs and contexts are drawn from
``(seed, image id)`` alone, the merged result equals a single-process run.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from narrows.errors import UserError
from narrows.interactions.estimator import estimate_image, planned_forwards, upstream_forwards
from narrows.interactions.model_value import ModelValue, predict
from narrows.interactions.players import PlayerGrid, normalised_baseline
from narrows.interactions.result import InteractionResult
from narrows.interactions.rewards import Reward
from narrows.interactions.sampling import UPSTREAM_RATIOS, PairSampling, max_pairs, order_of
from narrows.interactions.selection import per_class_first
from narrows.runtime import Distributed


@dataclass
class InteractionSettings:
    grid: int = 8
    pairs: int = 20
    contexts: int = 20
    ratios: tuple[float, ...] = UPSTREAM_RATIOS
    images: int = 10
    pair_sampling: PairSampling = "neighbour"
    radius: int = 2
    reward: Reward = "logodds"
    baseline: Literal["mean", "zero"] = "mean"
    only_correct: bool = True
    batch_size: int = 64
    seed: int = 0
    extra_meta: dict = field(default_factory=dict)

    def check(self, n: int) -> None:
        if not self.ratios or any(not 0 <= r <= 1 for r in self.ratios):
            raise UserError("ratios must lie in [0, 1]", "e.g. --ratios 0 0.1 0.5 0.9 1")
        if list(self.ratios) != sorted(self.ratios):
            raise UserError("ratios must be increasing", "sort the values given to --ratios")
        for name in ("pairs", "contexts", "images", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1", "give a positive count")
        if n < 3:
            raise UserError(f"a {self.grid}×{self.grid} grid has too few players", "use --grid 2 or more")
        limit = max_pairs(self.grid, self.pair_sampling, self.radius)
        if self.pairs > limit:
            raise UserError(f"{self.pairs} pairs asked for, only {limit} distinct "
                            f"{self.pair_sampling} pairs exist on a {self.grid}×{self.grid} grid",
                            f"use --pairs {limit} or fewer")


    def check_image(self, height: int, width: int) -> None:
        """The grid must cut ``height × width`` images into equal patches (a :class:`UserError`
        otherwise); with :meth:`check`, everything that can be checked before any model runs."""
        self.check(self.grid**2)
        PlayerGrid(self.grid, height, width)


@dataclass
class Plan:
    image_ids: list[int]
    labels: list[int]
    forwards_per_image: int
    upstream_per_image: int
    candidates: int
    misclassified: int = 0  # candidates left out by ``only_correct``

    @property
    def forwards(self) -> int:
        return self.forwards_per_image * len(self.image_ids)

    def describe(self, only_correct: bool, class_names: Sequence[str] | None = None) -> str:
        """One line: how many images are measured, of how many candidates, and why."""
        kept, total = len(self.image_ids), self.candidates
        text = f"{kept} image{'s' if kept != 1 else ''} of {total} candidates"
        if only_correct:
            text += (f" ({self.misclassified} misclassified, left out by --only-correct)"
                     if self.misclassified else " (all classified correctly)")
        if class_names and self.labels:
            counts: dict[int, int] = {}
            for label in self.labels:
                counts[label] = counts.get(label, 0) + 1
            text += "; per class: " + ", ".join(
                f"{_class_name(class_names, c)} {n}" for c, n in sorted(counts.items()))
        return text

    def shrunk(self, only_correct: bool, at_init: bool = False) -> str | None:
        """A note when ``only_correct`` kept few images (fewer than half, or a model at
        initialisation, which is right by chance only); ``None`` otherwise."""
        kept, total = len(self.image_ids), self.candidates
        if not only_correct or not self.misclassified or not (at_init or 2 * kept < total):
            return None
        why = ("a model at initialisation is right by chance only" if at_init
               else f"the model misclassifies {self.misclassified} of them")
        se = ("; one image gives no standard error" if kept == 1 else "")
        return (f"note: only {kept} of {total} candidate images are classified correctly ({why})"
                f"{se} — pass --no-only-correct to measure all {total}, or more --images")


def _class_name(names: Sequence[str], label: int) -> str:
    return str(names[label]) if 0 <= label < len(names) else f"class {label}"


def select(model: nn.Module, dataset: Dataset, num_classes: int, settings: InteractionSettings,
           normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device
           ) -> tuple[list[int], list[int], int]:
    """The official selection: first images of each class, then (optionally) only correct ones."""
    labels = list(getattr(dataset, "targets", None) or [int(dataset[i][1]) for i in
                                                         range(len(dataset))])
    candidates = per_class_first(labels, num_classes, settings.images)
    if not candidates:
        raise UserError("the data set has no images to explain", "check --data and --split")
    if settings.only_correct:
        images = torch.stack([dataset[i][0] for i in candidates])
        predicted = predict(model, normalize(images), device)
        kept = [i for i, p in zip(candidates, predicted.tolist(), strict=True) if p == labels[i]]
    else:
        kept = candidates
    return kept, [labels[i] for i in kept], len(candidates)


def constant_output_cause(model: nn.Module, at_init: bool = False) -> str:
    """The likely reason a model's reward does not change when patches are masked."""
    norms = [name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    zero = [name for name in norms
            if not model.get_submodule(name).weight.detach().any()]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if zero and at_init:
        return (f"a network at initialisation whose residual blocks start as identities "
                f"({len(zero)} zero-initialised BatchNorm layers, timm's zero-initialised last "
                "BatchNorm of each block) — train it first or pass a trained checkpoint")
    if zero:
        return (f"{len(zero)} of its {len(norms)} BatchNorm layers have all-zero scales (e.g. "
                f"{zero[0]}) — check that the checkpoint is a trained one")
    if linears and not linears[-1].weight.detach().any():
        return ("its last linear layer's weights are all zero — train it first or pass a "
                "trained checkpoint")
    if at_init:
        return "a network at initialisation — train it first or pass a trained checkpoint"
    return ("the model ignores its input — check the checkpoint, and that --data and its "
            "normalisation are the ones it was trained on")


@torch.inference_mode()
def full_and_empty_values(model: nn.Module, dataset: Dataset, image_ids: Sequence[int],
                          settings: InteractionSettings, *, mean: Sequence[float],
                          std: Sequence[float], device: torch.device) -> np.ndarray:
    """v(N) and v(∅) (every patch kept, every patch masked) of each image, ``(images, 2)``:
    two forward passes per image, a cheap check that the reward depends on the patches."""
    from narrows.training import Normalizer

    normalizer = Normalizer(mean, std)
    out = np.zeros((len(image_ids), 2))
    value = None
    for k, image_id in enumerate(image_ids):
        image, label = dataset[image_id]
        if value is None:
            c, h, w = image.shape
            baseline = normalised_baseline(settings.baseline, tuple(mean), tuple(std), (c, h, w))
            value = ModelValue(model.to(device), PlayerGrid(settings.grid, h, w), baseline,
                               settings.reward, device)
        masks = torch.zeros(2, settings.grid**2, dtype=torch.bool)
        masks[0] = True
        out[k] = value.bind(normalizer(image[None])[0], int(label))(masks).cpu().numpy()
    return out


def constant_reward(values: np.ndarray) -> bool:
    """True when v(N) == v(∅) for every image (see :func:`full_and_empty_values`)."""
    return bool(len(values)) and bool((values[:, 0] == values[:, 1]).all())


def plan(model: nn.Module, dataset: Dataset, num_classes: int, settings: InteractionSettings,
         normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
         image_ids: Sequence[int] | None = None, candidates: int | None = None) -> Plan:
    """Check the settings and choose the images (or take ``image_ids``, chosen before from
    ``candidates`` images: with another model, for a comparison on the same images)."""
    n = settings.grid**2
    settings.check(n)
    if image_ids is None:
        ids, labels, count = select(model, dataset, num_classes, settings, normalize, device)
    else:
        ids = list(image_ids)
        labels = [int(dataset[i][1]) for i in ids]
        count = len(ids) if candidates is None else candidates
    return Plan(ids, labels, planned_forwards(n, settings.ratios, settings.pairs, settings.contexts),
                upstream_forwards(settings.ratios, settings.pairs, settings.contexts), count,
                count - len(ids))


def measure_speed(model: nn.Module, grid: PlayerGrid, image: torch.Tensor, batch_size: int,
                  device: torch.device, channels_last: bool = False) -> float:
    """Masked forwards per second, from two timed batches (for the printed estimate)."""
    value = ModelValue(model, grid, torch.zeros_like(image), "logit", device,
                       channels_last).bind(image, 0)
    masks = torch.rand(batch_size, grid.n) < 0.5
    value(masks)  # warm-up
    start = time.perf_counter()
    value(masks)
    value(masks)
    return 2 * batch_size / max(time.perf_counter() - start, 1e-9)


def image_file(directory: Path, image_id: int) -> Path:
    return directory / f"{image_id:07d}.npz"


def run(model: nn.Module, dataset: Dataset, plan_: Plan, settings: InteractionSettings, *,
        mean: Sequence[float], std: Sequence[float], device: torch.device,
        images_dir: Path | None = None, dist: Distributed = Distributed(), progress: bool = True,
        channels_last: bool = False, at_init: bool = False) -> InteractionResult:
    """Estimate every planned image (skipping those already in ``images_dir``) and merge.

    When every Δv is 0 (J undefined), the likely cause is recorded in the result's meta
    (``at_init``: the model has not been trained) and :meth:`InteractionResult.warning` says it.
    """
    from tqdm.auto import tqdm

    from narrows.training import Normalizer

    if dist.enabled and images_dir is None:
        raise ValueError("a distributed run merges the ranks' images through images_dir: give one")
    normalizer = Normalizer(mean, std)
    first = dataset[plan_.image_ids[0]][0] if plan_.image_ids else None
    if first is None:
        raise UserError("no image is left to explain (none was classified correctly)",
                        "pass --no-only-correct, or use more --images")
    c, h, w = first.shape
    grid = PlayerGrid(settings.grid, h, w)
    baseline = normalised_baseline(settings.baseline, tuple(mean), tuple(std), (c, h, w))
    value = ModelValue(model.to(device), grid, baseline, settings.reward, device, channels_last)
    mine = plan_.image_ids[dist.rank::dist.world_size]
    done: dict[int, dict] = {}
    for position, image_id in enumerate(mine):
        path = image_file(images_dir, image_id) if images_dir else None
        if path is not None and path.is_file():
            continue
        image, label = dataset[image_id]
        bar = tqdm(total=plan_.forwards_per_image, unit="fwd", leave=False,
                   desc=f"image {position + 1}/{len(mine)} (#{image_id})",
                   disable=None if progress and dist.is_main else True)
        start = time.perf_counter()
        est = estimate_image(value.bind(normalizer(image[None])[0], int(label)), grid.n,
                             settings.ratios, settings.pairs, settings.contexts, seed=settings.seed,
                             image_id=image_id, grid=settings.grid,
                             pair_sampling=settings.pair_sampling, radius=settings.radius,
                             batch_size=settings.batch_size, on_batch=bar.update)
        bar.close()
        record = {"dv": est.dv, "pairs": est.pairs.astype(np.int16), "label": int(label),
                  "forwards": est.forwards, "seconds": time.perf_counter() - start}
        if path is not None:
            _save_npz(path, record)
        else:
            done[image_id] = record
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    result = merge(plan_, settings, images_dir, done)
    if result.degenerate():
        result.meta["constant_output_cause"] = constant_output_cause(model, at_init)
    return result


def merge(plan_: Plan, settings: InteractionSettings, images_dir: Path | None,
          in_memory: dict[int, dict] | None = None) -> InteractionResult:
    records = []
    for image_id in plan_.image_ids:
        if in_memory and image_id in in_memory:
            records.append(in_memory[image_id])
        else:
            from narrows.runs.files import read_npz, reading

            file = image_file(images_dir, image_id)
            record = read_npz(file, "cached per-image result",
                              required=("dv", "pairs", "forwards", "seconds"))
            with reading(file, "cached per-image result"):
                shape = (len(settings.ratios),) + tuple(records[0]["dv"].shape[1:] if records
                                                        else record["dv"].shape[1:])
                if record["dv"].ndim != 3 or record["dv"].shape != shape:
                    raise ValueError(f"dv has shape {record['dv'].shape}, expected {shape}")
                if record["pairs"].shape != (shape[1], 2):
                    raise ValueError(f"pairs has shape {record['pairs'].shape}, expected "
                                     f"{(shape[1], 2)}")
                int(record["forwards"]), float(record["seconds"])
            records.append(record)
    n = settings.grid**2
    meta = {**{k: v for k, v in asdict(settings).items() if k != "extra_meta"},
            **settings.extra_meta,
            "forwards": int(sum(int(r["forwards"]) for r in records)),
            "forwards_upstream": plan_.upstream_per_image * len(records),
            "compute_seconds": float(sum(float(r["seconds"]) for r in records)),
            "candidates": plan_.candidates,
            "misclassified_left_out": plan_.misclassified,
            "versions": _versions()}
    return InteractionResult(
        dv=np.stack([r["dv"] for r in records]),
        pairs=np.stack([r["pairs"] for r in records]),
        ratios=tuple(settings.ratios),
        orders=tuple(order_of(n, r) for r in settings.ratios),
        grid=settings.grid,
        image_ids=list(plan_.image_ids),
        labels=[int(r["label"]) for r in records],
        meta=meta,
    )


def multi_order(model: nn.Module, images: torch.Tensor, labels: Sequence[int], *,
                mean: Sequence[float], std: Sequence[float],
                settings: InteractionSettings | None = None, device: torch.device | str = "cpu",
                progress: bool = False, at_init: bool = False) -> InteractionResult:
    """Interactions of ``images (B,C,H,W)`` in [0, 1] with their true ``labels``, in memory.

    ``mean``/``std``: the normalisation; ``settings`` default to :class:`InteractionSettings`.
    All images are used (no selection); image ids are their positions 0..B−1. ``at_init``:
    the model is untrained (only used to name the likely cause of a degenerate result).
    """
    settings = settings or InteractionSettings()
    dataset = _FloatDataset(images, labels)
    p = Plan(list(range(len(labels))), list(map(int, labels)),
             planned_forwards(settings.grid**2, settings.ratios, settings.pairs, settings.contexts),
             upstream_forwards(settings.ratios, settings.pairs, settings.contexts), len(labels))
    settings.check(settings.grid**2)
    return run(model, dataset, p, settings, mean=mean, std=std, device=torch.device(device),
               progress=progress, at_init=at_init)


class _FloatDataset(Dataset):
    def __init__(self, images: torch.Tensor, labels: Sequence[int]) -> None:
        self.images, self.targets = images.float(), [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def _save_npz(path: Path, record: dict) -> None:
    from narrows.runs.files import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **record)
    atomic_write_bytes(path, buffer.getvalue())


def _versions() -> dict[str, str]:
    import timm

    from narrows import __version__

    return {"narrows": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__}
