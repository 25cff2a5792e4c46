"""Value training from cached fetch indices.

Once the keys and the projection are frozen, the pairs a sample fetches never change, so the
search runs once per sample (:func:`cache_indices`) and every training step is a gather, the
decoder, and an update of the fetched value rows. :func:`train_values` does what training
through ``layer(z)`` with ``torch.optim.SGD`` (no momentum, no weight decay), cross-entropy with
label smoothing and gradient-norm clipping does, batch for batch (the batch order is
:func:`epoch_order`), to float rounding; with ``sparse=True`` it updates only the fetched rows
by hand instead of materialising the dense gradient of the value table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from narrows.kvb.layer import KeyValueBottleneck
from narrows.runtime import derive_seed

#: Added to the gradient norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does.
CLIP_EPS = 1e-6


@dataclass
class TrainStats:
    """Steps taken, mean batch loss per epoch, and steps whose gradient norm was clipped."""

    steps: int = 0
    loss_per_epoch: list[float] = field(default_factory=list)
    clipped_steps: int = 0


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """The order of ``num_samples`` samples in one epoch: a permutation keyed by
    ``(seed, epoch)``, or 0..N−1 without ``shuffle``."""
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


@torch.no_grad()
def cache_indices(
    layer: KeyValueBottleneck,
    embeddings: Tensor,
    *,
    batch_size: int = 1024,
    prune: bool = False,
    dtype: torch.dtype = torch.int64,
) -> Tensor:
    """Fetched indices ``(N, n, C, t)`` of ``layer`` (keys frozen) for ``embeddings`` ``(N, D)``
    or ``(N, n, D)``, on the CPU; ``prune`` searches among used pairs only.

    Searching in batches gives the same indices as one search (the search is exact per query).
    ``dtype`` may be a smaller integer type (int16 holds J ≤ 32 767) to save memory.
    """
    if not layer.frozen:
        raise RuntimeError("cache indices only after the keys are frozen (init_keys or freeze())")
    device = layer.projection.device
    parts = [layer.indices(embeddings[i:i + batch_size].to(device), prune=prune).to("cpu", dtype)
             for i in range(0, embeddings.shape[0], batch_size)]
    if not parts:
        return torch.empty(0, 1, layer.num_codebooks, layer.topk, dtype=dtype)
    return torch.cat(parts)


@torch.no_grad()
def pruned_indices(
    layer: KeyValueBottleneck,
    indices: Tensor,
    embeddings: Tensor,
    *,
    batch_size: int = 1024,
) -> Tensor:
    """Cached ``indices`` ``(N, n, C, t)`` of ``embeddings`` with the pruning of ``layer``
    applied: the samples that fetch a never-used pair (usage 0) are searched again among used
    pairs only; the others keep their indices, which is what the
    pruned search gives them (their t nearest pairs are all used)."""
    device = layer.usage.device
    out = indices.clone()
    flat = layer._flat(indices.to(device)).flatten(1)
    unused = (layer.usage.view(-1)[flat] == 0).any(1).nonzero().squeeze(1).cpu()
    for i in range(0, unused.numel(), batch_size):
        rows = unused[i:i + batch_size]
        found = layer.indices(embeddings[rows].to(layer.projection.device), prune=True)
        out[rows] = found.to(out.device, out.dtype)
    return out


@torch.no_grad()
def logits_from_cache(layer: KeyValueBottleneck, indices: Tensor, *, batch_size: int = 4096) -> Tensor:
    """Logits ``(N, K)`` of ``layer`` for cached ``indices`` ``(N, n, C, t)``, on the CPU (eval
    mode, nothing counted)."""
    was_training = layer.training
    layer.eval()
    try:
        device = layer.values.device
        parts = [layer.logits_from_indices(indices[i:i + batch_size].to(device)).cpu()
                 for i in range(0, indices.shape[0], batch_size)]
    finally:
        layer.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, layer.num_classes)


def _sparse_step(layer: KeyValueBottleneck, idx: Tensor, labels: Tensor, *, lr: float,
                 label_smoothing: float, clip: float | None) -> tuple[Tensor, Tensor]:
    """One SGD step that touches only the fetched value rows; returns (loss, clipped)."""
    V = layer.dim_value
    table = layer.values.view(-1, V)
    flat = layer._flat(idx)
    fetched = table.detach()[flat].requires_grad_(True)
    loss = F.cross_entropy(layer.decode(fetched), labels, label_smoothing=label_smoothing)
    (grad,) = torch.autograd.grad(loss, fetched)
    rows, inverse = torch.unique(flat.reshape(-1), return_inverse=True)
    row_grad = torch.zeros(rows.numel(), V, dtype=grad.dtype, device=grad.device)
    row_grad.index_add_(0, inverse, grad.reshape(-1, V))
    clipped = torch.zeros((), dtype=torch.bool, device=grad.device)
    if clip is not None and clip > 0:
        norm = torch.linalg.vector_norm(row_grad)
        coef = torch.clamp(clip / (norm + CLIP_EPS), max=1.0)
        row_grad.mul_(coef)
        clipped = norm > clip
    with torch.no_grad():
        table.index_add_(0, rows, row_grad, alpha=-lr)
    return loss.detach(), clipped


def train_values(
    layer: KeyValueBottleneck,
    indices: Tensor,
    labels: Tensor,
    *,
    epochs: int = 1,
    lr: float = 0.3,
    batch_size: int = 256,
    label_smoothing: float = 0.1,
    clip: float | None = 1.0,
    seed: int = 0,
    shuffle: bool = True,
    sparse: bool = False,
    count_usage: bool = True,
    on_epoch: Callable[[int, TrainStats], None] | None = None,
    progress: bool = False,
) -> TrainStats:
    """Train the values of ``layer`` (and a decoder built with ``train_decoder``) from cached
    indices, for ``epochs`` epochs; returns the :class:`TrainStats`.

    ``indices`` ``(N, n, C, t)`` (any integer type, any device) and ``labels`` ``(N,)`` are the
    cached fetches and the global class ids. Each epoch visits the samples in
    :func:`epoch_order` ``(seed, epoch)`` (in order without ``shuffle``) in batches of
    ``batch_size`` (the last may be short);
    each step is plain SGD (``lr``, no momentum, no weight decay) on the batch-mean
    cross-entropy with ``label_smoothing``, after clipping the gradient norm over all trained
    parameters to ``clip`` (None or 0: no clipping). ``count_usage`` adds the fetched pairs to
    ``layer.usage`` as training through ``forward`` does. ``sparse`` updates only the fetched
    rows by hand (values only; not with a trainable decoder). ``on_epoch(epoch, stats)`` runs
    after each epoch. The layer is left in the mode it was in.
    """
    if not layer.frozen:
        raise RuntimeError("train values only after the keys are frozen (init_keys or freeze())")
    if indices.dim() != 4 or indices.shape[2:] != (layer.num_codebooks, layer.topk):
        raise ValueError(f"expected cached indices (N, n, {layer.num_codebooks}, {layer.topk}), "
                         f"got {tuple(indices.shape)}")
    if labels.shape != (indices.shape[0],):
        raise ValueError(f"expected {indices.shape[0]} labels, got shape {tuple(labels.shape)}")
    if batch_size < 1 or epochs < 0:
        raise ValueError("batch_size must be at least 1 and epochs at least 0")
    params = [p for p in layer.parameters() if p.requires_grad]
    if sparse and any(p is not layer.values for p in params):
        raise ValueError("sparse updates train the values only; the decoder is trainable")
    device = layer.values.device
    optimizer = None if sparse else torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    stats = TrainStats()
    was_training = layer.training
    layer.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc="values", unit="epoch")
    try:
        num = indices.shape[0]
        for epoch in range(epochs):
            order = epoch_order(num, seed, epoch, shuffle).to(indices.device)
            total = torch.zeros((), device=device)
            clipped_total = torch.zeros((), dtype=torch.int64, device=device)
            batches = 0
            for start in range(0, num, batch_size):
                sel = order[start:start + batch_size]
                idx = indices[sel].to(device=device, dtype=torch.int64)
                y = labels[sel.to(labels.device)].to(device=device, dtype=torch.int64)
                if sparse:
                    loss, clipped = _sparse_step(layer, idx, y, lr=lr,
                                                 label_smoothing=label_smoothing, clip=clip)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(layer.logits_from_indices(idx), y,
                                           label_smoothing=label_smoothing)
                    loss.backward()
                    clipped = torch.zeros((), dtype=torch.bool, device=device)
                    if clip is not None and clip > 0:
                        clipped = torch.nn.utils.clip_grad_norm_(params, clip) > clip
                    optimizer.step()
                    loss = loss.detach()
                if count_usage:
                    layer.count_usage(idx)
                total += loss
                batches += 1
                stats.steps += 1
                clipped_total += clipped
            stats.loss_per_epoch.append(float(total) / max(batches, 1))
            stats.clipped_steps += int(clipped_total)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss_per_epoch[-1]:.4g}")
            if on_epoch is not None:
                on_epoch(epoch, stats)
    finally:
        if bar is not None:
            bar.close()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        layer.train(was_training)
    return stats
