"""What a training run needs before the loop: its data, the model with its card, and the
summary written after it. ``narrows train`` and every method that trains (order losses, CSG)
use these, and a Python user gets the same model and card the command would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from narrows.errors import UserError

DEFAULT_MODEL = "resnet20_cifar"


def load_start(checkpoint: str | None, *, model: str | None = None,
               model_kwargs: dict[str, Any] | None = None) -> Any:
    """The ``checkpoint`` a run starts from (a :class:`narrows.models.LoadedModel`), or ``None``."""
    if not checkpoint:
        return None
    from narrows.models import load_model

    return load_model(checkpoint, name=model, model_kwargs=model_kwargs or {})


def training_data(spec: str, *, image_size: int | None = None, checkpoint: str | None = None,
                  card: Any = None, download: bool = False) -> Any:
    """``spec`` at ``image_size``; for data served at any size without one, at the size of the
    ``checkpoint`` the run starts from (``card``: its model card, read here when not given).
    ``download`` fetches data sets that can be downloaded. Returns the loaded data bundle."""
    from narrows.data import load
    from narrows.data.specs import parse_spec
    from narrows.models.inputs import RESIZABLE_KINDS

    size = image_size
    if size is None and checkpoint and parse_spec(spec).kind in RESIZABLE_KINDS:
        if card is None:
            from narrows.models import read_checkpoint

            card = read_checkpoint(checkpoint).card
        if card is not None:
            size = card.input_size  # go on at the size the checkpoint was trained at
    return load(spec, download=download, image_size=size)


#: BEiT's scale of a new classifier's initial weights (trunc-normal std 0.02 times this)
HEAD_INIT_SCALE = 0.001


def with_drop_path(model_kwargs: dict[str, Any] | None, drop_path: float) -> dict[str, Any]:
    """``model_kwargs`` with ``drop_path_rate=drop_path`` when ``drop_path > 0`` (a different
    ``drop_path_rate`` already there is a :class:`UserError`)."""
    given = dict(model_kwargs or {})
    if drop_path > 0:
        if given.get("drop_path_rate", drop_path) != drop_path:
            raise UserError(f"--drop-path {drop_path:g} and --model-kwargs drop_path_rate="
                            f"{given['drop_path_rate']} disagree", "give one of them")
        given["drop_path_rate"] = drop_path
    return given


def _refused_keyword(message: str, name: str) -> bool:
    """Whether a model-building error ``message`` says the constructor does not take the
    keyword ``name`` (timm's TypeError as the factory words it, or a narrows entry point's
    list of options it does not take), not merely that ``name`` was among the arguments."""
    unknown = message.partition("does not take the option(s) ")[2]
    return (f"unexpected keyword argument '{name}'" in message
            or name in [word.strip() for word in unknown.split(",")])


def is_backbone(card: Any, net: Any) -> bool:
    """Whether a loaded checkpoint (its ``card`` and model ``net``) is a bare backbone (card
    ``num_classes == 0``, e.g. written by ``narrows ssl export``) that gets a new classifier
    for the data."""
    return (card is not None and card.num_classes == 0 and getattr(net, "num_classes", 0) == 0
            and callable(getattr(net, "reset_classifier", None)))


def new_classifier(net: Any, num_classes: int, *, init_scale: float = HEAD_INIT_SCALE) -> None:
    """Give backbone ``net`` a classifier of ``num_classes`` (timm ``reset_classifier``, the
    pooling kept): weight trunc-normal with std 0.02 times ``init_scale``, bias 0 (BEiT's
    fine-tuning init); drawn from torch's global generator, as a fresh model's weights are."""
    import torch

    pool = getattr(net, "global_pool", None)
    if isinstance(pool, str):
        net.reset_classifier(num_classes, pool)
    else:
        net.reset_classifier(num_classes)
    head = net.get_classifier() if callable(getattr(net, "get_classifier", None)) else net.head
    with torch.no_grad():
        torch.nn.init.trunc_normal_(head.weight, std=0.02)
        head.weight.mul_(init_scale)
        if head.bias is not None:
            head.bias.zero_()


def model_for_training(info: Any, *, model: str | None = None, checkpoint: str | None = None,
                       loaded: Any = None, model_kwargs: dict[str, Any] | None = None,
                       drop_path: float = 0.0) -> tuple[Any, Any]:
    """The model to train on data ``info`` and its card: fresh from timm (or the user's
    module), or from ``checkpoint`` (``loaded``: :func:`load_start`'s result when at hand).

    ``model_kwargs`` go to the model's constructor (over the checkpoint card's);
    ``drop_path`` > 0 adds ``drop_path_rate`` to them (a model without it is refused).
    A checkpoint holding a bare backbone (card ``num_classes == 0``) gets a new classifier for
    the data's classes (:func:`new_classifier`); other checkpoints must have the data's.
    The model is built for the data's image size (``img_size`` for fixed-size models) and one
    image is run through it, so a model that cannot take the data is a :class:`UserError`
    before anything is written.
    """
    from narrows.models import ModelCard, canonical_name, create_for_input, is_custom
    from narrows.models.factory import check_runs_on

    given = with_drop_path(model_kwargs, drop_path)
    if checkpoint:
        loaded = loaded if loaded is not None else load_start(checkpoint, model=model,
                                                              model_kwargs=given)
        net, card = loaded.model, loaded.card
        moved = card is None or (model and is_custom(model))  # a moved file: where it is now
        architecture = canonical_name(model) if moved else card.architecture
        model_kwargs = {**(card.model_kwargs if card else {}), **given}
        if is_backbone(card, net):
            new_classifier(net, info.num_classes)
        classes = getattr(net, "num_classes", info.num_classes)
        if isinstance(classes, int) and classes != info.num_classes:
            raise UserError(f"{checkpoint} has {classes} classes but {info.spec} has "
                            f"{info.num_classes}",
                            "train from a checkpoint of the same classes, or without one")
        check_runs_on(net, architecture, in_chans=info.in_chans, image_size=info.image_size,
                      num_classes=info.num_classes, data=info.spec,
                      took_size="img_size" in model_kwargs)
        net.train()
    else:
        name = model or DEFAULT_MODEL
        net, model_kwargs = create_for_input(
            name, num_classes=info.num_classes, in_chans=info.in_chans,
            image_size=info.image_size, model_kwargs=given, data=info.spec)
        architecture = canonical_name(name)
    card = ModelCard(
        architecture=architecture, num_classes=info.num_classes, in_chans=info.in_chans,
        input_size=info.image_size, mean=tuple(info.mean), std=tuple(info.std),
        class_names=tuple(info.class_names), data_spec=absolute_spec(info.spec),
        model_kwargs=model_kwargs,
    )
    return net, card


def checkpoint_data(checkpoint: str | None, default: str = "digits") -> str:
    """The data spec in ``checkpoint``'s model card, else ``default``."""
    spec = None
    if checkpoint:
        from narrows.models import read_checkpoint

        card = read_checkpoint(checkpoint).card
        spec = card.data_spec if card else None
    return spec or default


def prepare_training(spec: str, *, model: str | None = None, checkpoint: str | None = None,
                     model_kwargs: dict[str, Any] | None = None, image_size: int | None = None,
                     download: bool = False, drop_path: float = 0.0) -> tuple[Any, Any, Any]:
    """``(model, card, data)`` of a training run: the ``checkpoint`` it starts from (see
    :func:`load_start`), the data of ``spec`` (see :func:`training_data`) and the model for it
    (see :func:`model_for_training`, which also takes ``model``, ``model_kwargs`` and
    ``drop_path``); ``image_size`` and ``download`` as in :func:`training_data`."""
    model_kwargs = with_drop_path(model_kwargs, drop_path)
    try:
        loaded = load_start(checkpoint, model=model, model_kwargs=model_kwargs)
        data = training_data(spec, image_size=image_size, checkpoint=checkpoint,
                             card=loaded.card if loaded is not None else None, download=download)
        built, card = model_for_training(data.info, model=model, checkpoint=checkpoint,
                                         loaded=loaded, model_kwargs=model_kwargs)
    except UserError as error:  # the model refused the drop_path_rate that `drop_path` added
        if drop_path > 0 and _refused_keyword(error.what, "drop_path_rate"):
            raise UserError(f"{error.what} (asked for by `drop_path` {drop_path:g})",
                            "pass `drop_path` 0: this model has no stochastic depth") from None
        raise
    return built, card, data


def absolute_spec(spec: str) -> str:
    """``spec`` with its path made absolute (``folder:data`` → ``folder:/home/me/data``), so a
    checkpoint's card finds its data from any directory; other specs are returned as given."""
    from narrows.data.specs import NEEDS_PATH, parse_spec

    parsed = parse_spec(spec)
    if parsed.kind not in NEEDS_PATH:
        return spec
    return f"{parsed.kind}:{Path(parsed.argument).expanduser().resolve()}"


def test_split_description(spec: str) -> str:
    """Which images a run's test accuracy is measured on (held out from a flat folder, ...)."""
    from narrows.data.imagenet import folder_test_split
    from narrows.data.specs import parse_spec

    parsed = parse_spec(spec)
    if parsed.kind == "folder":
        return folder_test_split(parsed.argument)
    return "the data set's own test split"


def training_summary(result: Any, card: Any, spec: str) -> dict[str, Any]:
    """The flat ``results.json`` of a training run: its ``result`` (a
    :class:`narrows.training.TrainResult`), the model ``card`` and the data ``spec``."""
    return {
        "summary": result.summary(),
        "model": card.architecture,
        "data": spec,
        "image_size": card.input_size,
        "model_kwargs": dict(card.model_kwargs),
        "test_split": test_split_description(spec),
        "epochs": result.epochs,
        "best_top1": result.best_top1,
        "final": result.final.to_dict() if result.final else None,
        "best_checkpoint": result.best_checkpoint,
        "last_checkpoint": result.last_checkpoint,
    }
