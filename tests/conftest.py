"""Shared test setup: keep torch to two threads; random-init checkpoints with a full card.

The tests mirror the source tree: ``core/``, one folder per method (``interactions/``,
``attribution/``, ``decompose/``, ``kvb/``) and ``cli/`` for end-to-end command lines;
``userdata.py`` (this folder, on ``sys.path``) writes the users' kinds of data for all of them and
``tiny.py`` holds the tiny models, data and checkpoints several files share.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # userdata.py, tiny.py for every folder

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Callable[..., str]:
    """``make(data_spec, architecture="resnet20_cifar", seed=0) -> path``: a seeded random-init
    checkpoint whose card carries the data's classes, size, normalisation and spec."""
    directory = tmp_path_factory.mktemp("random-checkpoints")

    def make(data_spec: str, architecture: str = "resnet20_cifar", seed: int = 0) -> str:
        from tiny import random_checkpoint_at

        path = Path(directory) / f"{architecture}-{abs(hash(data_spec))}-{seed}.pt"
        if not path.is_file():
            random_checkpoint_at(path, data_spec, architecture, seed)
        return str(path)

    return make
