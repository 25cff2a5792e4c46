"""Shared test setup: threads, random-init checkpoints with a full card.

Under pytest-xdist (``make test`` runs two workers) each worker is pinned to a core of its own,
so torch and every command's ``--threads 0`` use one thread there instead of oversubscribing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if len(_cores) >= _count > 1:
        os.sched_setaffinity(0, {_cores[int(_WORKER[2:]) % len(_cores)]})
torch.set_num_threads(min(2, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity")
                      else 2)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Callable[..., str]:
    """``make(data_spec, architecture="resnet20_cifar", seed=0) -> path``: a seeded random-init
    checkpoint whose card carries the data's classes, size, normalisation and spec."""
    directory = tmp_path_factory.mktemp("random-checkpoints")

    def make(data_spec: str, architecture: str = "resnet20_cifar", seed: int = 0) -> str:
        from narrows.data import load
        from narrows.models import ModelCard, create, save_model

        info = load(data_spec).info
        path = Path(directory) / f"{architecture}-{abs(hash(data_spec))}-{seed}.pt"
        if not path.is_file():
            torch.manual_seed(seed)
            net = create(architecture, num_classes=info.num_classes, in_chans=info.in_chans)
            card = ModelCard(architecture=architecture, num_classes=info.num_classes,
                             in_chans=info.in_chans, input_size=info.image_size,
                             mean=tuple(info.mean), std=tuple(info.std), data_spec=data_spec)
            save_model(path, net, card)
        return str(path)

    return make
