"""Frozen-backbone embeddings on disk: computed once, named and checked by their metadata.

One file per (backbone, data set, split), ``{backbone}_{data}_{split}.pt`` (upstream named its
files without the data set, so every data set overwrote the previous one's). The file holds the
pooled pre-logits features ``(N, D)`` float32, the labels ``(N,)`` int64 and an
:class:`EmbeddingMeta`: data spec, split, backbone id, architecture, checkpoint and its SHA-256,
preprocessing (mean, std, input size, resize) and dimension. :func:`load_embeddings` refuses a
file whose metadata differs from what the caller asks for (a :class:`UserError`).

:func:`compute_embeddings` runs the backbone in eval mode without gradients, batch by batch,
saving a ``.partial`` file every few batches, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from narrows.data.specs import data_key
from narrows.data.streaming import Streaming
from narrows.errors import UserError
from narrows.runs.files import sha256_file

FORMAT = "narrows-kvb-embeddings"
VERSION = 1
LAYER = "pre-logits"  # the input of the classifier: timm's forward_head(..., pre_logits=True)


@dataclass(frozen=True)
class EmbeddingMeta:
    """What an embedding file holds and how it was made."""

    data: str  # the data spec
    split: str
    backbone: str  # the id in file names: "arch@sha8" or "arch@init-sN"
    architecture: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    preprocessing: dict[str, Any] = field(default_factory=dict, hash=False)
    dim: int = 0
    count: int = 0
    layer: str = LAYER
    class_names: tuple[str, ...] = ()

    @property
    def data_key(self) -> str:
        return data_key(self.data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["class_names"] = list(self.class_names)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingMeta:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["class_names"] = tuple(values.get("class_names", ()))
        return cls(**values)


@dataclass
class Embeddings:
    """Features ``(N, D)``, labels ``(N,)`` and their :class:`EmbeddingMeta`."""

    features: Tensor
    labels: Tensor
    meta: EmbeddingMeta

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write the file atomically (a reader never sees half of it)."""
        from narrows.runs import atomic_torch_save

        return atomic_torch_save(path, {"format": FORMAT, "version": VERSION,
                                        "meta": self.meta.to_dict(),
                                        "features": self.features.contiguous(),
                                        "labels": self.labels.contiguous()})


def file_name(backbone: str, data: str, split: str) -> str:
    """``{backbone}_{data}_{split}.pt`` with file-name-safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.@=-]+", "_", backbone).strip("_")
    return f"{safe}_{data_key(data)}_{split}.pt"


def embedding_path(directory: str | Path, backbone: str, data: str, split: str) -> Path:
    return Path(directory) / file_name(backbone, data, split)


def read_meta(path: str | Path) -> EmbeddingMeta:
    """The metadata of an embedding file (memory-mapped: the features are not read)."""
    return _meta_of(path, _read(path, mmap=True))


def load_embeddings(path: str | Path, **expect: Any) -> Embeddings:
    """Read an embedding file, refusing it unless every ``expect`` field matches its metadata.

    ``expect`` takes fields of :class:`EmbeddingMeta` (``data``, ``split``, ``backbone``,
    ``dim``, ...); ``None`` values are not checked. A missing, foreign or mismatched file is a
    :class:`UserError`.
    """
    raw = _read(path, mmap=False)
    meta = _meta_of(path, raw)
    check_meta(meta, path, **expect)
    features, labels = raw.get("features"), raw.get("labels")
    if (not isinstance(features, Tensor) or not isinstance(labels, Tensor) or features.ndim != 2
            or labels.shape != (features.shape[0],) or features.shape[1] != meta.dim):
        raise UserError(f"{path} is damaged (its tensors do not match its metadata)",
                        "embed again with 'narrows kvb embed'")
    return Embeddings(features.float(), labels.long(), meta)


def check_meta(meta: EmbeddingMeta, path: str | Path, **expect: Any) -> None:
    """Raise a :class:`UserError` naming the first field of ``meta`` that differs from ``expect``."""
    known = {f.name for f in fields(EmbeddingMeta)}
    for key, wanted in expect.items():
        if key not in known:
            raise ValueError(f"unknown embedding metadata field {key!r}")
        if wanted is None:
            continue
        have = getattr(meta, key)
        if have != wanted:
            raise UserError(f"{path} holds embeddings with {key} {have!r}, not {wanted!r}",
                            "embed the data asked for with 'narrows kvb embed', or pass the "
                            "matching options")


def _read(path: str | Path, *, mmap: bool) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no embedding file {path}",
                        "make it with 'narrows kvb embed --checkpoint ... --data ...'")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{path} is not a readable embedding file ({type(exc).__name__})",
                        "make it with 'narrows kvb embed'") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path} is not a narrows embedding file",
                        "make it with 'narrows kvb embed'")
    return raw


def _meta_of(path: str | Path, raw: dict[str, Any]) -> EmbeddingMeta:
    try:
        return EmbeddingMeta.from_dict(raw["meta"])
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path} has damaged metadata ({exc})", "embed again") from None


@dataclass(frozen=True)
class EmbeddingSet:
    """The embeddings of one data set through one backbone found in a directory, by split."""

    backbone: str
    data: str
    splits: dict[str, EmbeddingMeta] = field(hash=False)

    @property
    def labelled(self) -> bool:
        """Whether both the train and the test split are there (a task can run on it)."""
        return "train" in self.splits and "test" in self.splits


def find_embeddings(directory: str | Path) -> list[EmbeddingSet]:
    """Every (backbone, data set) of the embedding files in ``directory``, read from their
    metadata (the features are not loaded); files that are not embeddings are skipped."""
    found: dict[tuple[str, str], dict[str, EmbeddingMeta]] = {}
    for path in sorted(Path(directory).glob("*.pt")):
        try:
            meta = read_meta(path)
        except UserError:
            continue
        expected = file_name(meta.backbone, meta.data, meta.split)
        if path.name != expected:
            claimed = path.stem.rpartition("_")[2]
            what = (f"split {meta.split!r}, not {claimed!r}" if claimed in ("train", "test")
                    and claimed != meta.split else f"data {meta.data!r} and backbone "
                    f"{meta.backbone!r}, which its name does not say")
            raise UserError(f"{path} holds embeddings with {what}",
                            f"rename it to {expected}, or embed again with 'narrows kvb embed'")
        found.setdefault((meta.backbone, meta.data), {})[meta.split] = meta
    return [EmbeddingSet(b, d, splits) for (b, d), splits in found.items()]


def choose_embeddings(directory: str | Path, *, data: str | None = None,
                      backbone: str | None = None) -> EmbeddingSet:
    """The one labelled set (train and test) in ``directory`` that fits ``data`` and
    ``backbone`` (either may be ``None``: inferred). None, or several to choose from, is a
    :class:`UserError` that names them."""
    sets = [s for s in find_embeddings(directory)
            if (data is None or s.data == data) and (backbone is None or s.backbone == backbone)]
    labelled = [s for s in sets if s.labelled]
    if len(labelled) == 1:
        return labelled[0]
    embed = (f"run 'narrows kvb embed --checkpoint FILE --data {data or 'SPEC'} --split train "
             f"test --out {directory}'")
    if not labelled:
        if data is not None and not any("train" in s.splits for s in sets):
            raise UserError(f"no training embeddings of {data} in {directory}", embed)
        what = f"of {data}" if data is not None else "with both a train and a test split"
        by = f" from backbone {backbone}" if backbone is not None else ""
        raise UserError(f"no embeddings {what}{by} in {directory}", embed)
    datas = sorted({s.data for s in labelled})
    if len(datas) > 1:
        raise UserError(f"{directory} holds embeddings of {len(datas)} data sets "
                        f"({', '.join(datas)})", "choose one with `data`")
    backbones = sorted({s.backbone for s in labelled})
    raise UserError(f"{directory} holds embeddings of {datas[0]} from {len(backbones)} "
                    f"backbones ({', '.join(backbones)})", "choose one with `backbone`")


# -- computing ---------------------------------------------------------------------------------
@dataclass
class Backbone:
    """A frozen feature extractor and how to name and feed it."""

    model: nn.Module
    id: str
    architecture: str
    checkpoint: str | None
    sha256: str | None
    mean: tuple[float, ...] | None  # the card's normalisation, when the checkpoint has one
    std: tuple[float, ...] | None
    data_spec: str | None  # the card's data
    input_size: int | None = None  # the card's input size


def load_backbone(checkpoint: str | None, *, model: str | None = None,
                  seed: int = 0) -> Backbone:
    """The checkpoint file ``checkpoint`` (its card, or ``model`` for the architecture), or
    without one the model ``model`` with random initial weights from ``seed`` (nothing is
    downloaded). A timm name given as ``checkpoint`` (the old ``--backbone NAME``) means
    ``model``."""
    from narrows.models import check_name, create, load_model

    if not checkpoint and not model:
        raise UserError("no backbone given", "pass --checkpoint FILE, or --model NAME for "
                        "random initial weights")
    backbone = checkpoint or str(model)
    path = Path(backbone)
    if checkpoint and path.is_file():
        loaded = load_model(path, name=model)
        card = loaded.card
        arch = card.architecture if card else str(model)
        sha = sha256_file(path)
        return Backbone(loaded.model, f"{arch}@{sha[:8]}", arch, str(path), sha,
                        tuple(card.mean) if card else None, tuple(card.std) if card else None,
                        card.data_spec if card else None, card.input_size if card else None)
    if checkpoint and (path.suffix in (".pt", ".pth", ".th", ".tar", ".bin", ".safetensors")
                       or "/" in checkpoint):
        raise UserError(f"no checkpoint file {checkpoint}",
                        "check the path, or pass --model NAME for random initial weights")
    if checkpoint and model is not None and model != checkpoint:
        raise UserError(f"--model {model} contradicts the model name {checkpoint} given as "
                        "checkpoint", "pass --model NAME alone for random initial weights")
    check_name(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create(backbone)
    net.eval()
    return Backbone(net, f"{backbone}@init-s{seed}", backbone, None, None, None, None, None)


def pooled_features(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x -> (B, D)``: the core's :func:`narrows.models.heads.pooled_features`, imported on
    first use so that this module loads without timm (tests replace it here)."""
    from narrows.models.heads import pooled_features as core_pooled_features

    return core_pooled_features(model)


@torch.no_grad()
def compute_embeddings(
    model: nn.Module,
    dataset: Any,
    meta: EmbeddingMeta,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize: int | None = None,
    how: Streaming = Streaming(progress=False, save_every=50),
) -> Embeddings:
    """Embed every image of ``dataset`` in order; ``meta`` is completed with dim and count.

    ``how``: device, batch size, workers, bar; with ``how.resume`` (a file path) the features
    computed so far are saved there every ``how.save_every`` batches and a later call with the
    same ``meta`` starts where that file stops.
    """
    import torch.nn.functional as F

    from narrows.data.streaming import Collected, stream_dataset
    from narrows.training import Normalizer

    model = model.to(how.device).eval()
    features_of = pooled_features(model)
    normalizer = Normalizer(mean, std)
    collected = Collected()

    def step(images: Tensor, labels: Tensor) -> None:
        if resize is not None and images.shape[-1] != resize:
            images = F.interpolate(images, size=(resize, resize), mode="bilinear",
                                   align_corners=False)
        collected.add({"features": features_of(normalizer(images))}, labels)

    key = meta.to_dict()
    stream_dataset(dataset, step, collected, how, key=key, desc=f"embedding {meta.split}")
    parts, labs = collected.joined()
    feats = parts.get("features", torch.empty(0, 0))
    final = EmbeddingMeta.from_dict({**key, "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
                                     "count": int(feats.shape[0])})
    return Embeddings(feats, labs, final)

