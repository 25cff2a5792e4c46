"""Class-incremental streams, the i.i.d. control, and running a learner through them (spec §5).

* Tasks: the class ids shuffled by the seed (or given), cut into groups of ``classes_per_task``.
* ``incremental``: one phase per task; phase t visits the training samples of task t's classes
  for ``epochs`` seeded shuffles. One shared output over all classes; the learner is only handed
  batches, never a task id or a boundary signal.
* ``iid``: the control with the same sample visits: ``epochs`` seeded shuffles of the whole
  training set, cut into phases of exactly the incremental phases' visit counts, so both
  protocols are evaluated after the same number of visits.

A phase is lazy (its epochs' permutations are drawn while batching), so 2,000 epochs of CIFAR
never sit in memory. Batches run across epoch boundaries: a phase of V visits is
``ceil(V / batch_size)`` steps in both protocols.

:func:`run_stream` trains a :class:`Learner` phase by phase and scores every class on the test
set after each phase (a :class:`~narrows.kvb.results.ContinualResult`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from narrows.kvb.results import ContinualResult
from narrows.runtime import derive_seed, rebatch

PROTOCOLS = ("incremental", "iid")
ProtocolName = Literal["incremental", "iid"]


def make_tasks(num_classes: int, classes_per_task: int, seed: int,
               order: Sequence[int] | None = None) -> list[list[int]]:
    """Class ids shuffled by ``seed`` (or ``order``, a permutation of them) in groups."""
    if classes_per_task < 1 or num_classes % classes_per_task:
        raise ValueError(f"{num_classes} classes cannot be cut into tasks of {classes_per_task}")
    if order is None:
        gen = torch.Generator().manual_seed(derive_seed(seed, 0x7A5C))
        order = torch.randperm(num_classes, generator=gen).tolist()
    order = [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"the class order must be a permutation of 0..{num_classes - 1}, "
                         f"got {order}")
    return [order[i:i + classes_per_task] for i in range(0, num_classes, classes_per_task)]


@dataclass(frozen=True)
class Phase:
    """Visits ``start..stop`` of the endless sequence of seeded permutations of ``pool``."""

    pool: Tensor  # indices into the training set
    start: int
    stop: int
    seed: int
    classes: tuple[int, ...]  # the classes the phase's samples carry

    @property
    def visits(self) -> int:
        return self.stop - self.start

    def _epoch(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return self.pool[torch.randperm(len(self.pool), generator=gen)]

    def segments(self) -> Iterator[Tensor]:
        """The phase's visits, one piece per epoch it touches."""
        n = len(self.pool)
        if n == 0:
            return
        position = self.start
        while position < self.stop:
            epoch, offset = divmod(position, n)
            take = min(n - offset, self.stop - position)
            yield self._epoch(epoch)[offset:offset + take]
            position += take

    def order(self) -> Tensor:
        """All visits in order (materialised)."""
        parts = list(self.segments())
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Consecutive batches of ``batch_size`` visits (the last may be smaller)."""
        return rebatch(self.segments(), batch_size)

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.visits / batch_size)


@dataclass(frozen=True)
class Stream:
    """The tasks and the phases of one protocol."""

    protocol: str
    tasks: list[list[int]]
    phases: list[Phase]
    epochs: int

    @property
    def visits(self) -> int:
        return sum(p.visits for p in self.phases)


def incremental_stream(labels: Tensor, tasks: list[list[int]], epochs: int, seed: int) -> Stream:
    """One phase per task: ``epochs`` shuffles of that task's training samples."""
    phases = []
    for t, classes in enumerate(tasks):
        pool = _samples_of(labels, classes)
        phases.append(Phase(pool, 0, epochs * len(pool), derive_seed(seed, 1, t), tuple(classes)))
    return Stream("incremental", tasks, phases, epochs)


def iid_stream(labels: Tensor, tasks: list[list[int]], epochs: int, seed: int) -> Stream:
    """``epochs`` shuffles of all the tasks' samples, cut where the incremental phases end."""
    classes = [c for task in tasks for c in task]
    pool = _samples_of(labels, classes)
    phases, start = [], 0
    phase_seed = derive_seed(seed, 2)
    for task in tasks:
        visits = epochs * int(_samples_of(labels, task).numel())
        phases.append(Phase(pool, start, start + visits, phase_seed, tuple(sorted(classes))))
        start += visits
    return Stream("iid", tasks, phases, epochs)


def make_stream(protocol: str, labels: Tensor, tasks: list[list[int]], epochs: int,
                seed: int) -> Stream:
    if protocol == "incremental":
        return incremental_stream(labels, tasks, epochs, seed)
    if protocol == "iid":
        return iid_stream(labels, tasks, epochs, seed)
    raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")


def _samples_of(labels: Tensor, classes: Sequence[int]) -> Tensor:
    wanted = torch.tensor(list(classes), dtype=labels.dtype)
    return torch.nonzero(torch.isin(labels, wanted)).flatten()


# -- running -----------------------------------------------------------------------------------
class Learner(Protocol):
    """What :func:`run_stream` drives: training on a phase's batches, predicting the test set."""

    def train_phase(self, phase: Phase) -> dict[str, Any]: ...

    def predict_test(self) -> Tensor: ...


def per_class_accuracy(predictions: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Accuracy of each class (NaN for a class with no sample)."""
    out = []
    for c in range(num_classes):
        mask = labels == c
        n = int(mask.sum())
        out.append(float((predictions[mask] == c).float().mean()) if n else math.nan)
    return out


def run_stream(learner: Learner, stream: Stream, test_labels: Tensor, num_classes: int, *,
               model: str, meta: dict[str, Any] | None = None,
               log: Callable[[str], None] | None = None) -> ContinualResult:
    """Train phase by phase; score every class on the test set after each phase."""
    per_class, visits = [], []
    info: dict[str, Any] = dict(meta or {})
    for t, phase in enumerate(stream.phases):
        stats = learner.train_phase(phase)
        predictions = learner.predict_test()
        per_class.append(per_class_accuracy(predictions.cpu(), test_labels.cpu(), num_classes))
        visits.append(phase.visits)
        for key, value in (stats or {}).items():
            info[f"{key}_phase{t + 1}"] = value
        if log is not None:
            done = [c for task in stream.tasks[:t + 1] for c in task]
            seen = _nanmean([per_class[-1][c] for c in done])
            log(f"  {model}, {stream.protocol}: phase {t + 1}/{len(stream.phases)} "
                f"({phase.visits} visits), accuracy on the classes of tasks 1-{t + 1} "
                f"{seen:.3f}, on all {_nanmean(per_class[-1]):.3f}")
    return ContinualResult(model=model, protocol=stream.protocol, tasks=stream.tasks,
                           per_class=per_class, visits=visits, meta=info)


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
