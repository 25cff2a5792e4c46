"""Fine-tuning the decomposed network ("decomposed softmax") on the core training loop.

As upstream: cross-entropy on the decomposed logits with the indices fixed; every parameter
with ``requires_grad`` trains (the backbone, BatchNorm included, plus ``V`` and ``b'``; the
original ``W, b`` are frozen and unused); Adam with default betas, no weight decay, a constant
learning rate, no clipping; the test split is evaluated after every epoch. After fine-tuning the
original ``W`` no longer matches the backbone, so a fine-tuned model's full-head accuracy means
nothing and is never reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from narrows.decompose.head import decompose, decomposed_extra, find_decomposed, head_indices
from narrows.decompose.indices import ClassIndices
from narrows.decompose.options import FinetuneOptions
from narrows.errors import UserError
from narrows.runs.run import RunDir
from narrows.training import BEST, TrainSettings, fit

DECOMPOSED = "decomposed.pt"


def finetune_settings(options: FinetuneOptions | None = None, *, seed: int = 0,
                      **overrides: Any) -> TrainSettings:
    """Upstream's recipe as :class:`TrainSettings`: AdamW without weight decay (that is Adam),
    a constant learning rate; the data set's standard augmentation.

    The options are ``options`` (default: those of ``narrows decompose finetune``) with
    ``overrides`` by field name of :class:`FinetuneOptions` (``epochs=``, ``lr=``,
    ``batch_size=``, ``augment=``, ``workers=``, ``eval_batch_size=``); its ``indices`` are
    not a setting (pass them to :func:`finetune`)."""
    opts = replace(FinetuneOptions() if options is None else options, **overrides)
    return TrainSettings(
        epochs=opts.epochs, batch_size=opts.batch_size, optimizer="adamw", lr=opts.lr,
        momentum=0.0, weight_decay=0.0, schedule="constant", augment=opts.augment,
        workers=opts.workers, eval_batch_size=opts.eval_batch_size, seed=seed,
    )


def finetune(
    model: nn.Module,
    indices: ClassIndices | None,
    data: Any,
    settings: TrainSettings,
    *,
    card: Any,
    device: torch.device,
    run: RunDir | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    dist: Any = None,
) -> tuple[nn.Module, Any]:
    """Decompose ``model`` with ``indices`` (``None``: it is decomposed already), train it with
    :func:`narrows.training.fit` on ``data`` (a data bundle) with ``settings`` (a
    :class:`~narrows.training.TrainSettings`) and the model ``card`` stored in each checkpoint,
    and return ``(decomposed model, TrainResult)``.

    With ``run``, ``fit`` writes its checkpoints there (each holds the indices as the head's
    buffers), and ``decomposed.pt`` is written from the best epoch with the indices also
    recorded as JSON under the ``decompose`` entry.
    """
    from narrows.runtime import Distributed

    net = model if indices is None else decompose(model, indices)
    head = find_decomposed(net)
    if head is None:
        raise UserError("the model is not decomposed and no indices were given",
                        "pass the indices to decompose it with")
    kwargs: dict[str, Any] = {"dist": dist if dist is not None else Distributed()}
    result = fit(net, data, settings, card=card, device=device, run=run, progress=progress,
                 log=log, **kwargs)
    if run is not None and run.writer and run.exists(BEST):
        write_decomposed(run.file(DECOMPOSED), run.file(BEST), net, card, head_indices(head))
    return net, result


def write_decomposed(
    path: str | Path, best: str | Path, net: nn.Module, card: Any, indices: ClassIndices
) -> Path:
    """Save the weights of ``best`` (a ``fit`` checkpoint) with the card and the indices."""
    import copy

    from narrows.models import save_model
    from narrows.models.strict import load_state_dict_strict

    state = torch.load(best, map_location="cpu", weights_only=True)
    model = copy.deepcopy(net).cpu()
    load_state_dict_strict(model, state["state_dict"], str(best))
    extra = {**decomposed_extra(indices), "epoch": int(state.get("epoch", 0)),
             "test_top1": float(state.get("test_top1", float("nan")))}
    return save_model(path, model, card, extra)


def subject_card(subject: Any, checkpoint: str | None = None,
                 architecture: str | None = None) -> Any:
    """The :class:`~narrows.models.ModelCard` of a loaded subject for its decomposed checkpoint:
    ``checkpoint``'s card with the subject's data spec, else one built from the data."""
    from narrows.models import ModelCard, read_checkpoint

    info = subject.bundle.info
    saved = read_checkpoint(checkpoint).card if checkpoint else None
    if saved is not None:
        return ModelCard(**{**saved.to_dict(), "data_spec": info.spec})
    return ModelCard(architecture=architecture or "model", num_classes=info.num_classes,
                     in_chans=info.in_chans, input_size=info.image_size,
                     mean=tuple(subject.mean), std=tuple(subject.std),
                     class_names=tuple(info.class_names), data_spec=info.spec)


def finetune_summary(result: Any, *, name: str, indices: str, k: int,
                     checkpoint: str | Path) -> dict[str, Any]:
    """The flat ``results.json`` of a fine-tuning run (``result``: its ``TrainResult``)."""
    return {"summary": result.summary(), "model": name, "indices": indices, "k": k,
            "epochs": result.epochs,
            "best_top1": result.best_top1,
            "final": result.final.to_dict() if result.final else None,
            "per_epoch_test_top1": [r["test_top1"] for r in result.metrics],
            "checkpoint": str(checkpoint)}
