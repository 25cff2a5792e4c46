"""Tiny models, data and checkpoints shared by the tests (this folder is on ``sys.path``).

Each helper builds exactly what the copies it replaced built: same seeds, same order of random
draws, so the numbers the tests check do not move.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from narrows.models import ModelCard


def seeded_model(architecture: str = "resnet20_cifar", seed: int = 0, **create_kwargs: Any
                 ) -> nn.Module:
    """``torch.manual_seed(seed)`` then ``narrows.models.create(architecture, **create_kwargs)``
    (in training mode, as ``create`` returns it)."""
    from narrows.models import create

    torch.manual_seed(seed)
    return create(architecture, **create_kwargs)


def random_subject(data_spec: str, architecture: str = "resnet20_cifar", seed: int = 0, *,
                   image_size: int | None = None, class_names: bool = False,
                   **model_kwargs: Any) -> tuple[nn.Module, ModelCard]:
    """A seeded random-init model for ``data_spec`` and its card: the data's classes, channels,
    size (``image_size`` when given), normalisation and spec; its class names only when
    ``class_names``; ``model_kwargs`` go to ``create`` and onto the card."""
    from narrows.data import load

    info = load(data_spec, image_size=image_size).info
    net = seeded_model(architecture, seed, num_classes=info.num_classes, in_chans=info.in_chans,
                       **model_kwargs)
    card = ModelCard(architecture=architecture, num_classes=info.num_classes,
                     in_chans=info.in_chans, input_size=info.image_size, mean=tuple(info.mean),
                     std=tuple(info.std), data_spec=data_spec,
                     class_names=tuple(info.class_names) if class_names else None,
                     model_kwargs=model_kwargs)
    return net, card


def random_checkpoint_at(path: str | Path, data_spec: str, architecture: str = "resnet20_cifar",
                         seed: int = 0, **subject_options: Any) -> str:
    """Save :func:`random_subject`'s model and card to ``path``; returns the path as a string."""
    from narrows.models import save_model

    net, card = random_subject(data_spec, architecture, seed, **subject_options)
    return str(save_model(path, net, card))


def uint8_images(n: int, size: int, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """``n`` seeded random uint8 images ``(n, channels, size, size)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def same_rows(a: list[dict], b: list[dict]) -> bool:
    """Two lists of flat records are equal, NaN counting as equal to NaN."""
    def norm(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [{k: norm(v) for k, v in r.items()} for r in a] == \
        [{k: norm(v) for k, v in r.items()} for r in b]


def random_batches(count: int, batch: int, size: int, seed: int | None = None
                   ) -> list[torch.Tensor]:
    """``count`` standard-normal image batches ``(batch, 3, size, size)`` drawn from the global
    RNG, seeded with ``seed`` first when given."""
    if seed is not None:
        torch.manual_seed(seed)
    return [torch.randn(batch, 3, size, size) for _ in range(count)]


def quietly(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` with warnings silenced (statistics of random-init models on
    random inputs warn about inactive units)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


#: the tiny ViT and head of the ssl tests: 2 blocks, 48 wide, 8-px patches (16 tokens at 32 px)
SSL_VIT = "vit_tiny_patch16_224"
SSL_TINY = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
SSL_HEAD = {"out_dim": 64, "head_hidden": 64, "head_bottleneck": 32}


def one_torch_thread():
    """Generator body of a fixture that runs a test on one torch thread (tiny models on a
    shared CPU are far faster without thread hand-offs) and restores the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def released_udi_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A ``UDIModel``'s weights under the released UDI code's key names, written here
    independently of narrows' own mapping: the backbone nested twice with its two class tokens
    joined as ``cls_token [1, 2, D]``, SRS under ``backbone.attn``/``backbone.norm1``, the head
    saved three times."""
    ours = model.state_dict()
    out = {}
    for key, value in ours.items():
        if key == "backbone.cls_token":
            out[prefix + "backbone.backbone.cls_token"] = torch.cat(
                [value, ours["backbone.reg_token"]], dim=1)
        elif key == "backbone.reg_token":
            continue
        elif key.startswith("backbone."):
            out[prefix + "backbone." + key] = value
        elif key.startswith("srs."):
            out[prefix + "backbone.attn." + key[4:]] = value
        elif key.startswith("norm1."):
            out[prefix + "backbone.norm1." + key[6:]] = value
        else:
            assert key.startswith("head.")
            for i in range(3):  # the same head saved three times
                out[f"{prefix}head.{i}.{key[5:]}"] = value
    return out


def check_result_contract(result: Any, folder: Path, file: str, header_file: str,
                          kind: str) -> None:
    """The result contract on ``result``: flat rows, a one-line summary, ``save`` to
    ``folder/file`` and ``load`` back with the same rows, the header (``kind``, version 1,
    versions) in ``folder/header_file``, and ``plot()`` / ``plot(ax=...)`` giving (fig, ax)."""
    import json

    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from narrows.runs.results import Result

    assert isinstance(result, Result)
    rows = result.to_rows()
    assert rows and all(isinstance(r, dict) for r in rows)
    assert all(isinstance(v, (str, int, float, bool, type(None))) for r in rows
               for v in r.values())
    line = result.summary()
    assert isinstance(line, str) and line and "\n" not in line
    result.save(folder / file)
    loaded = type(result).load(folder / file)
    assert same_rows(loaded.to_rows(), rows)
    doc = json.loads((folder / header_file).read_text())
    assert doc["format"] == f"narrows.{kind}/1" and doc["provenance"]["versions"]["torch"]
    fig, _ = result.plot()  # the second item: one axes or several
    assert isinstance(fig, Figure)
    plt.close(fig)
    fig, mine = plt.subplots()
    got_fig, got_ax = result.plot(ax=mine)
    assert got_fig is fig and got_ax is mine and mine.has_data()
    plt.close(fig)
