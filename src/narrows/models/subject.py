"""The subject of an analysis: a checkpoint (or a model name with fresh weights), the data set
it is analysed on, served at the size and with the normalisation its card says, and names for
the outputs. Every analysing command and every library user starts here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from narrows.errors import UserError


@dataclass
class Subject:
    """A model to analyse with its data, normalisation and names for outputs."""

    model: Any  # torch.nn.Module
    bundle: Any  # narrows.data.DataBundle
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str  # "architecture (checkpoint)" or "architecture (init)"
    stem: str  # a directory-name-friendly identifier


def load_subject(checkpoint: str | None = None, model: str | None = None, data: str | None = None,
                 image_size: int | None = None, say: Any = print) -> Subject:
    """The model of ``checkpoint`` (or a fresh ``model``), the data set and normalisation.

    The data, its served size and the normalisation default to the checkpoint's card;
    ``image_size`` overrides the size for data served at any size (see
    :func:`narrows.models.inputs.data_for_model`); a class-count mismatch between model and data
    or a size the model cannot take is a :class:`UserError`.
    """
    from narrows.models.factory import create, load_model
    from narrows.models.inputs import data_for_model, size_kwargs

    card = None
    net = None
    if checkpoint:
        loaded = load_model(checkpoint, name=model)
        net, card = loaded.model, loaded.card
    elif not model:
        raise UserError("no model given", "pass --checkpoint FILE, or --model NAME for random "
                        "initial weights")
    spec = data or (card.data_spec if card else None)
    if not spec:
        raise UserError("no data given", "pass --data SPEC (e.g. digits)")
    if checkpoint:
        served = data_for_model(spec, card, net, image_size=image_size, say=say,
                                what=str(checkpoint))
    else:
        served = data_for_model(spec, None, None, image_size=image_size, say=say)
        info = served.bundle.info
        net = create(model, num_classes=info.num_classes, in_chans=info.in_chans,
                     **size_kwargs(model, info.image_size))
    bundle = served.bundle
    architecture = card.architecture if card else (model or "model")
    if checkpoint:
        name = f"{architecture} ({checkpoint})"
        stem = Path(checkpoint).parent.name + "-" + Path(checkpoint).stem
    else:
        name, stem = f"{architecture} (init)", f"{model}-init"
    return Subject(net, bundle, served.mean, served.std, name, stem)
