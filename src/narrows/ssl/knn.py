"""DINO's weighted k-nearest-neighbour classifier on L2-normalised features.

Each test feature takes its k most cosine-similar training features; neighbour j votes for its
class with weight exp(sim_j / T); classes are ranked by their summed votes. The result is exact
and deterministic:

* neighbours are the top ``min(k, n_train)`` by similarity, ties broken by the lower training
  index (``topk`` alone picks an arbitrary member of a tie);
* classes are ranked by votes, ties broken by the lower class index;
* top-5 counts a hit when the label is among the first ``min(5, C)`` classes (DINO uses
  ``min(5, k)``, which differs only when k < 5).

All k of one call share one top-``max(k)`` search. Test features go in chunks of
``memory_mb`` MiB of similarities (at least one row: DINO's ``n_test // 100`` chunks crash on
fewer than 100 images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.runtime import Distributed

DEFAULT_K, DEFAULT_T = 20, 0.07
DEFAULT_KS = (10, 20, 100, 200)


def chunk_rows(n_train: int, memory_mb: int) -> int:
    """Test rows per chunk so that ``rows × n_train`` float32 similarities fit ``memory_mb``
    MiB (at least 1)."""
    return max(1, (int(memory_mb) << 20) // (4 * max(int(n_train), 1)))


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise UserError(f"kNN needs k values of at least 1, got {ks}", "pass e.g. --k 10 20 100 200")
    return ks


def _ranked_neighbours(similarity: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` largest similarities of each row and their columns, ordered by similarity
    descending, ties by the lower column."""
    top, index = similarity.topk(count, dim=1)
    # topk may have picked any member of a tie at the boundary: rows with more candidates
    # at or above their last value than places are ranked in full with a stable sort
    crowded = (similarity >= top[:, -1:]).sum(1) > count
    # within the chosen set: lower column first, then a stable sort by similarity
    index, order = index.sort(dim=1)
    top = top.gather(1, order)
    order = (-top).sort(dim=1, stable=True).indices
    top, index = top.gather(1, order), index.gather(1, order)
    if crowded.any():
        rows = crowded.nonzero().squeeze(1)
        full = (-similarity[rows]).sort(dim=1, stable=True).indices[:, :count]
        index[rows] = full
        top[rows] = similarity[rows].gather(1, full)
    return top, index


def knn_scores(train: Tensor, train_labels: Tensor, test: Tensor, *, num_classes: int,
               ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_T,
               chunk: int | None = None, memory_mb: int = 512) -> dict[int, Tensor]:
    """Per k in ``ks``: the class votes ``[n_test, num_classes]`` (float64) of the weighted
    kNN of ``test`` among ``train`` (labels ``train_labels`` in ``[0, num_classes)``).

    Features may have any scale (they are L2-normalised here); k is capped at the number of
    training features; each vote is exp(cosine / ``temperature``). Test rows go ``chunk`` at a
    time (default: as many as ``memory_mb`` MiB of similarities allow)."""
    ks = _check_ks(ks)
    if temperature <= 0:
        raise UserError(f"kNN temperature {temperature} is not positive", "pass e.g. 0.07")
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float().to(train.device), dim=1)
    labels = train_labels.long().to(train.device)
    n_train, n_test = train.shape[0], test.shape[0]
    count = min(max(ks), n_train)
    rows = chunk_rows(n_train, memory_mb) if chunk is None else max(1, int(chunk))
    pieces: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, n_test, rows):
        block = test[start:start + rows]
        if count == 0:
            for k in ks:
                pieces[k].append(torch.zeros(block.shape[0], num_classes, dtype=torch.float64,
                                             device=train.device))
            continue
        top, index = _ranked_neighbours(block @ train.T, count)
        weights = (top / temperature).exp().double()
        votes_of = labels[index]
        for k in ks:
            n = min(k, count)
            votes = torch.zeros(block.shape[0], num_classes, dtype=torch.float64,
                                device=train.device)
            votes.scatter_add_(1, votes_of[:, :n], weights[:, :n])
            pieces[k].append(votes)
    return {k: (torch.cat(p) if p else torch.zeros(0, num_classes, dtype=torch.float64))
            for k, p in pieces.items()}


def class_ranking(votes: Tensor) -> Tensor:
    """Classes of each row of ``votes`` [n, C] from most to fewest votes, ties by lower class."""
    return (-votes).sort(dim=1, stable=True).indices


def knn_hits(votes: Tensor, labels: Tensor) -> tuple[int, int]:
    """``(top-1 hits, top-5 hits)`` of the class ``votes`` [n, C] against ``labels`` [n];
    top-5 looks at the first ``min(5, C)`` classes."""
    if votes.shape[0] == 0:
        return 0, 0
    ranking = class_ranking(votes)
    labels = labels.long().to(ranking.device).unsqueeze(1)
    top1 = int((ranking[:, :1] == labels).sum())
    top5 = int((ranking[:, :min(5, votes.shape[1])] == labels).any(1).sum())
    return top1, top5


def knn_evaluate(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, *,
                 num_classes: int, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_T, memory_mb: int = 512, chunk: int | None = None,
                 dist: Distributed = Distributed()) -> dict[int, tuple[float, float]]:
    """Per k in ``ks``: ``(top-1, top-5)`` accuracy in [0, 1] of :func:`knn_scores` (``train``,
    ``train_labels``, ``test``, ``num_classes``, ``temperature``, ``memory_mb``, ``chunk``)
    against ``test_labels``; NaN without test images.

    Under torchrun every rank passes the whole train bank and its own shard of the test set;
    the hit counts are summed over the ranks. An empty ``train`` is a :class:`UserError`."""
    if train.shape[0] == 0:
        raise UserError("kNN has no training features to vote",
                        "use data whose train split has images")
    scores = knn_scores(train, train_labels, test, num_classes=num_classes, ks=ks,
                        temperature=temperature, chunk=chunk, memory_mb=memory_mb)
    counts = torch.tensor([[*knn_hits(v, test_labels), test.shape[0]] for v in scores.values()],
                          dtype=torch.float64)
    if dist.enabled:
        import torch.distributed as td

        counts = counts.to(train.device)
        td.all_reduce(counts)
        counts = counts.cpu()
    out = {}
    for k, (top1, top5, n) in zip(scores, counts.tolist(), strict=True):
        out[k] = (top1 / n, top5 / n) if n > 0 else (float("nan"), float("nan"))
    return out


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_T,
                chunk: int = 1024) -> Tensor:
    """Class scores ``[n_test, num_classes]`` of the weighted kNN vote of ``test_features``
    among ``train_features`` (labels ``train_labels``): each of the ``k`` most cosine-similar
    neighbours votes exp(similarity / ``temperature``). Features may have any scale (they are
    L2-normalised here); ``k`` is capped at the number of training features; test features go
    ``chunk`` at a time."""
    votes = knn_scores(train_features, train_labels, test_features, num_classes=num_classes,
                       ks=(k,), temperature=temperature, chunk=chunk)[k]
    return votes.float()


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
             test_labels: Tensor, *, num_classes: int, k: int = DEFAULT_K,
             temperature: float = DEFAULT_T) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` (``train_features``, ``train_labels``,
    ``test_features``, ``num_classes``, ``k``, ``temperature``) on ``test_labels``."""
    if test_features.shape[0] == 0:
        return float("nan")
    votes = knn_scores(train_features, train_labels, test_features, num_classes=num_classes,
                       ks=(k,), temperature=temperature, chunk=1024)[k]
    return knn_hits(votes, test_labels)[0] / test_features.shape[0]


@torch.no_grad()
def embed_images(encode: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                 prepare: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of every ``(images, labels)`` pair of ``batches``:
    ``encode(prepare(images))`` on the CPU."""
    features, labels = [], []
    for images, targets in batches:
        features.append(encode(prepare(images)).float().cpu())
        labels.append(torch.as_tensor(targets).long().cpu())
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def teacher_knn(model: nn.Module, train_batches: Iterable, test_batches: Iterable, *,
                prepare: Callable[[Tensor], Tensor], num_classes: int, token: str = "cls",
                k: int = DEFAULT_K, temperature: float = DEFAULT_T) -> float:
    """kNN top-1 (:func:`knn_top1` with ``num_classes``, ``k``, ``temperature``) of
    ``model.backbone_features(prepare(x))[token]`` (the model in eval mode), the bank from
    ``train_batches`` and the queries from ``test_batches``."""
    was_training = model.training
    model.eval()
    try:
        def encode(x: Tensor) -> Tensor:
            return model.backbone_features(x)[token]

        train = embed_images(encode, train_batches, prepare)
        test = embed_images(encode, test_batches, prepare)
    finally:
        model.train(was_training)
    return knn_top1(*train, *test, num_classes=num_classes, k=k, temperature=temperature)
