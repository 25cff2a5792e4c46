"""DINO's weighted k-nearest-neighbour classifier on L2-normalised features.

Each test feature takes its k most cosine-similar training features; neighbour j votes for its
class with weight exp(sim_j / T); the class with the largest sum wins. Test features are
processed in chunks of bounded size, so memory stays at ``chunk × n_train`` similarities.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_K, DEFAULT_T = 20, 0.07


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, *,
                num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_T,
                chunk: int = 1024) -> Tensor:
    """Class scores ``[n_test, num_classes]`` of the weighted kNN vote of ``test_features``
    among ``train_features`` (labels ``train_labels``): each of the ``k`` most cosine-similar
    neighbours votes exp(similarity / ``temperature``). Features may have any scale (they are
    L2-normalised here); ``k`` is capped at the number of training features; test features go
    ``chunk`` at a time."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        similarity = test[start:start + chunk] @ train.T
        top, index = similarity.topk(k, dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(top.shape[0], num_classes, dtype=weights.dtype,
                            device=weights.device)
        votes.scatter_add_(1, train_labels.to(index.device)[index], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def knn_top1(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
             test_labels: Tensor, *, num_classes: int, k: int = DEFAULT_K,
             temperature: float = DEFAULT_T) -> float:
    """Top-1 accuracy in [0, 1] of :func:`knn_predict` (``train_features``, ``train_labels``,
    ``test_features``, ``num_classes``, ``k``, ``temperature``) on ``test_labels``."""
    if test_features.shape[0] == 0:
        return float("nan")
    scores = knn_predict(train_features, train_labels, test_features, num_classes=num_classes,
                         k=k, temperature=temperature)
    return (scores.argmax(1).cpu() == test_labels.cpu()).float().mean().item()


@torch.no_grad()
def embed_images(encode: Callable[[Tensor], Tensor], batches: Iterable[tuple[Tensor, Tensor]],
                 prepare: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of every batch: ``encode(prepare(images))`` on the CPU."""
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
    """kNN top-1 of ``model.backbone_features(x)[token]`` (the model in eval mode)."""
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
