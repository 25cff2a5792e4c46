"""Shared test setup: keep torch to two threads; random-init checkpoints with a full card.

The tests mirror the source tree: ``core/``, one folder per method (``interactions/``,
``attribution/``, ``decompose/``, ``kvb/``) and ``cli/`` for end-to-end command lines;
``userdata.py`` (this folder, on ``sys.path``) writes the users' kinds of data for all of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # userdata.py for every folder

torch.set_num_threads(2)


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
