"""Fill an embedding store: :func:`embed` runs a frozen backbone over the splits of a data set
and saves one file per split (``{backbone}_{data}_{split}.pt``, with its metadata).

A split whose file holds the same source is kept (said, not recomputed); a file with other
embeddings is a :class:`~narrows.errors.UserError` unless ``overwrite``. A killed run resumes
from its partial file. Parameter names in messages are in backticks (the command line shows
them as flags).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from narrows.errors import UserError

#: The directory of the embeddings when none is given.
DEFAULT_EMBEDDINGS = "embeddings"
SOURCE_KEYS = ("data", "split", "backbone", "checkpoint_sha256", "preprocessing", "layer")


def embed(checkpoint: str | None = None, *, model: str | None = None, data: str | None = None,
          splits: Sequence[str] = ("train", "test"), out: str | Path = DEFAULT_EMBEDDINGS,
          image_size: int | None = None, resize: int | None = None,
          normalize: Literal["auto", "data", "imagenet"] = "auto", batch_size: int = 256,
          workers: int = 0, save_every: int = 50, overwrite: bool = False, seed: int = 0,
          device: Any = "cpu", progress: bool = False,
          say: Callable[[str], Any] = print, options: Any = None) -> dict[str, Path]:
    """Embed the ``splits`` of ``data`` (default: the checkpoint card's) through the frozen
    backbone ``checkpoint`` (or the architecture ``model``, with random initial weights from
    ``seed`` without a checkpoint) into the directory ``out``; returns each split's file.

    ``normalize``: ``auto`` (the card's mean/std, else the data's), ``data`` or ``imagenet``;
    ``resize``: images to N×N before the backbone; ``image_size``: the served size of
    imagenet:/folder: data (default: the card's). ``options``: an
    :class:`~narrows.kvb.options.EmbedOptions` (or any object with its attributes, such as the
    command's config) whose values replace the parameters left at their defaults (its
    ``split`` is ``splits``). A split's file holding the same embeddings is kept, one holding
    others is a :class:`~narrows.errors.UserError` unless ``overwrite``; a killed run resumes
    from its partial file, saved every ``save_every`` batches."""
    if options is not None:
        given = dict(locals())
        del given["options"]
        return embed(**_with_options(given, options))
    from narrows.data import load
    from narrows.data.specs import parse_spec
    from narrows.data.streaming import Streaming
    from narrows.kvb.embeddings import EmbeddingMeta, embedding_path, load_backbone
    from narrows.models.inputs import RESIZABLE_KINDS

    if not checkpoint and not model:
        raise UserError("no backbone given", "pass `checkpoint` FILE, or `model` NAME for "
                        "random initial weights")
    backbone = load_backbone(checkpoint, model=model, seed=seed)
    spec = data or backbone.data_spec
    if not spec:
        raise UserError("no data given", "pass `data` SPEC (e.g. digits)")
    size = image_size
    if size is None and parse_spec(spec).kind in RESIZABLE_KINDS:
        size = backbone.input_size  # the card's size is the default
    bundle = load(spec, image_size=size)
    info = bundle.info
    mean, std = normalisation(normalize, backbone, info)
    preprocessing = {"mean": list(mean), "std": list(std), "image_size": info.image_size,
                     "resize": resize}
    files: dict[str, Path] = {}
    for split in dict.fromkeys(splits):
        meta = EmbeddingMeta(data=spec, split=split, backbone=backbone.id,
                             architecture=backbone.architecture, checkpoint=backbone.checkpoint,
                             checkpoint_sha256=backbone.sha256, preprocessing=preprocessing,
                             class_names=tuple(info.class_names))
        path = files[split] = embedding_path(Path(out), backbone.id, spec, split)
        if _kept(path, meta, overwrite, say):
            continue
        dataset = bundle.split(split, "none")
        say(f"embedding {len(dataset)} {split} images of {spec} through {backbone.id} "
            f"on {device} → {path}")
        how = Streaming(device, batch_size, workers, progress, save_every=save_every,
                        resume=path.with_name(f".{path.name}.partial"))
        _embed_split(backbone, dataset, meta, path, mean=mean, std=std, resize=resize,
                     how=how, overwrite=overwrite, say=say)
    return files


def _with_options(given: dict[str, Any], options: Any) -> dict[str, Any]:
    """``given`` (the arguments of :func:`embed`) with the values of ``options``' fields for the
    arguments left at their defaults."""
    import dataclasses
    import inspect

    from narrows.kvb.options import EmbedOptions

    defaults = {p.name: p.default for p in inspect.signature(embed).parameters.values()}
    for field in dataclasses.fields(EmbedOptions):
        name = "splits" if field.name == "split" else field.name
        if hasattr(options, field.name) and given[name] == defaults[name]:
            given[name] = getattr(options, field.name)
    return given


def _kept(path: Path, meta: Any, overwrite: bool, say: Callable[[str], Any]) -> bool:
    """Whether ``path`` already holds these embeddings (said); other embeddings there are an
    error unless ``overwrite``."""
    from narrows.kvb.embeddings import read_meta

    if not path.is_file() or overwrite:
        return False
    have = read_meta(path)
    if same_source(have, meta):
        say(f"{path}: already embedded ({have.count} × {have.dim}); pass `overwrite` "
            "to embed again")
        return True
    raise UserError(f"{path} holds other embeddings ({differing(have, meta)})",
                    "pass `overwrite` to replace it, or another `out`")


def _embed_split(backbone: Any, dataset: Any, meta: Any, path: Path, *, how: Any,
                 overwrite: bool, say: Callable[[str], Any], **options: Any) -> None:
    from narrows.kvb.embeddings import compute_embeddings

    if overwrite:
        Path(how.resume).unlink(missing_ok=True)
    result = compute_embeddings(backbone.model, dataset, meta, how=how, **options)
    result.save(path)
    say(f"  {result.meta.count} × {result.meta.dim} features → {path}")


def normalisation(mode: str, backbone: Any, info: Any) -> tuple[tuple[float, ...], ...]:
    """(mean, std) of ``mode``: ``imagenet``, ``auto`` (the backbone card's, else the data's)
    or ``data``."""
    if mode == "imagenet":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if mode == "auto" and backbone.mean is not None:
        return tuple(backbone.mean), tuple(backbone.std)
    return tuple(info.mean), tuple(info.std)


def same_source(have: Any, want: Any) -> bool:
    """Whether two :class:`~narrows.kvb.embeddings.EmbeddingMeta` describe the same
    embeddings (data, split, backbone, checkpoint, preprocessing, layer)."""
    return all(getattr(have, k) == getattr(want, k) for k in SOURCE_KEYS)


def differing(have: Any, want: Any) -> str:
    """The first two fields in which ``have`` and ``want`` differ, as text."""
    diff = [f"{k}: {getattr(have, k)!r} here, {getattr(want, k)!r} asked"
            for k in SOURCE_KEYS if getattr(have, k) != getattr(want, k)]
    return "; ".join(diff[:2])
