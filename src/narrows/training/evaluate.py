"""Top-1/top-5 accuracy and loss of a classifier on a data set, sharded over ranks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from narrows.runtime import Distributed
from narrows.training.batches import Normalizer


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float
    loss: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    normalizer: Normalizer,
    device: torch.device,
    *,
    batch_size: int = 256,
    workers: int = 0,
    dist: Distributed = Distributed(),
    progress: bool = False,
) -> EvalResult:
    """Top-1, top-5 and mean loss of ``model`` on ``dataset`` (images normalised with
    ``normalizer``), in eval mode; under torchrun each rank takes every ``world``-th image, no
    padding."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    subset = Subset(dataset, range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    bar = tqdm(loader, desc="evaluate", leave=False, disable=None if progress else True)
    for images, labels in bar:
        images = normalizer(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        logits = model(images)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(labels[:, None])
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(totals)
    model.train(was_training)
    n = int(totals[3].item())
    if n == 0:
        return EvalResult(float("nan"), float("nan"), float("nan"), 0)
    return EvalResult(
        top1=float(totals[1] / n), top5=float(totals[2] / n), loss=float(totals[0] / n), n=n
    )
