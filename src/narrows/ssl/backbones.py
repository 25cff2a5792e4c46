"""The backbone an evaluation reads, and its features over a data split (cached on disk).

:func:`load_eval_backbone` turns any checkpoint layout
(:func:`narrows.ssl.checkpoints.detect_layout`) or a random ViT into an :class:`EvalBackbone`:
the timm ViT in eval mode, an id for cache directories and results, the layout it was read
from, its class tokens, normalisation and input size. :func:`backbone_features` runs it once
over a split and returns one :class:`FeatureTable` per feature spec: all token parts are
computed in that one pass (for the largest number of last blocks asked for) and each spec is
selected from them, in memory (``cache=None``) or through a
:class:`~narrows.data.feature_store.FeatureStore` directory that a killed pass resumes and a
rerun reuses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.models.features import (
    PRE_LOGITS,
    FeatureSpec,
    check_spec,
    class_tokens,
    select,
    token_parts,
)
from narrows.runs.files import sha256_file
from narrows.runtime import Distributed

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_TWO_NETWORKS = ("narrows-ssl", "udi-full", "dino-full")


@dataclass
class EvalBackbone:
    """A frozen ViT to evaluate and what the evaluation needs to know about it.

    ``id``: ``"arch@sha8"`` of the file (``-student`` for a pretraining checkpoint's student,
    ``-k<hash>`` with model arguments), or ``"arch@init-sN-<hash>"`` for random weights —
    part of every cache key; ``layout``: how the file was read (printed, and stored in results);
    ``input_size``: the side the images are resized to; ``data_spec``: the data the file names.
    """

    vit: nn.Module
    id: str
    layout: str
    num_class_tokens: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    data_spec: str | None
    which: str
    architecture: str = ""
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def patch_size(self) -> int:
        """The ViT's patch side in pixels."""
        patch = self.vit.patch_embed.patch_size
        return int(patch if isinstance(patch, int) else patch[0])

    def describe(self) -> str:
        """One line: what was loaded, from where, with how many class tokens."""
        source = f"{self.checkpoint} ({self.layout}" + (
            f", {self.which})" if self.layout in _TWO_NETWORKS else ")") \
            if self.checkpoint else "random initial weights"
        tokens = {2: "cls and cls+", 1: "cls", 0: "no class token"}.get(self.num_class_tokens, "")
        return f"{self.architecture or self.id} from {source}: {tokens}, input {self.input_size}px"

    def provenance(self) -> dict[str, Any]:
        """The facts results record about the backbone."""
        return {"id": self.id, "architecture": self.architecture, "layout": self.layout,
                "which": self.which, "checkpoint": self.checkpoint,
                "class_tokens": self.num_class_tokens, "input_size": self.input_size,
                "mean": list(self.mean), "std": list(self.std), "notes": list(self.notes)}


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:6]


def _kwargs(model_kwargs: dict[str, Any] | str | None) -> dict[str, Any]:
    if isinstance(model_kwargs, str) or model_kwargs is None:
        from narrows.training.model_kwargs import parse_model_kwargs

        return parse_model_kwargs(model_kwargs)
    return dict(model_kwargs)


def _spec_size(vit: nn.Module, fallback: int = 224) -> int:
    from narrows.models.vit_tokens import CREATE_SPEC

    spec = getattr(vit, CREATE_SPEC, None)
    if spec and "img_size" in spec.get("kwargs", {}):
        return int(spec["kwargs"]["img_size"])
    size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(size if isinstance(size, int) else size[0])
    return fallback


def _tokens_of(vit: nn.Module) -> int:
    try:
        return class_tokens(vit)
    except UserError:
        return 0


def load_eval_backbone(checkpoint: str | Path | None = None, *, model: str | None = None,
                       model_kwargs: dict[str, Any] | str | None = None, class_tokens: int = 2,
                       which: Literal["teacher", "student"] = "teacher", seed: int = 0,
                       image_size: int | None = None) -> EvalBackbone:
    """The backbone to evaluate, in eval mode on the CPU.

    ``checkpoint``: a file of any layout of :data:`narrows.ssl.checkpoints.LAYOUTS`; ``which``
    picks the teacher or student of a pretraining checkpoint; ``model`` names the timm ViT to
    build a backbone-only or upstream file into (default: read from the file) and
    ``model_kwargs`` (a dict or ``"k=v,..."``) adjust it (e.g. ``num_heads=``). Without a
    checkpoint: a random ``model`` from ``seed`` with ``class_tokens`` (1 or 2) class tokens,
    built for ``image_size`` (default 224). ``image_size`` otherwise overrides the input side
    the images are resized to (default: the file's).
    """
    from narrows.models.vit_tokens import create_vit

    kwargs = _kwargs(model_kwargs)
    if checkpoint is None:
        if not model:
            raise UserError("nothing to evaluate", "pass `checkpoint` FILE, or `model` NAME "
                            "for random initial weights")
        size = int(image_size or kwargs.pop("img_size", 224))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = create_vit(model, num_class_tokens=class_tokens, img_size=size, **kwargs)
        build = _short_hash((sorted(kwargs.items()), class_tokens, size))
        return EvalBackbone(vit.eval(), f"{model}@init-s{seed}-{build}", "init", class_tokens,
                            IMAGENET_MEAN, IMAGENET_STD, size, None, which, model, None)
    from narrows.ssl.checkpoints import detect_layout

    path = Path(checkpoint)
    layout = detect_layout(path, which=which)
    notes: list[str] = []
    mean, std, data_spec = IMAGENET_MEAN, IMAGENET_STD, None
    size: int | None = None
    if layout == "narrows-card":
        from narrows.models import load_model

        loaded = load_model(path, name=model, model_kwargs=kwargs or None)
        vit, card = loaded.model, loaded.card
        architecture = card.architecture if card else str(model)
        if card is not None:
            mean, std, data_spec = tuple(card.mean), tuple(card.std), card.data_spec
            size = card.input_size
    elif layout == "narrows-ssl":
        from narrows.ssl.export import load_pretrained

        udi, facts = load_pretrained(path, which=which)
        vit = udi.backbone
        mean, std, data_spec = tuple(facts["mean"]), tuple(facts["std"]), facts["data"]
        size = facts.get("img_size")
        architecture = _architecture_name(vit)
    elif layout in ("udi-full", "dino-full"):
        from narrows.ssl.checkpoints import load_upstream

        udi, _ = load_upstream(path, which=which, name=model, **kwargs)
        vit = udi.backbone
        architecture = _architecture_name(vit)
    else:
        from narrows.ssl.checkpoints import load_backbone_only

        vit, notes = load_backbone_only(path, layout, name=model, which=which, **kwargs)
        architecture = _architecture_name(vit)
    vit = vit.eval()
    suffix = f"-{which}" if layout in _TWO_NETWORKS and which != "teacher" else ""
    if kwargs:
        suffix += f"-k{_short_hash(sorted(kwargs.items()))}"
    ident = f"{architecture}@{sha256_file(path)[:8]}{suffix}"
    return EvalBackbone(vit, ident, layout, _tokens_of(vit), tuple(mean), tuple(std),
                        int(image_size or size or _spec_size(vit)), data_spec, which,
                        architecture, str(path), notes)


def _architecture_name(vit: nn.Module) -> str:
    from narrows.models.vit_tokens import CREATE_SPEC

    spec = getattr(vit, CREATE_SPEC, None)
    return str(spec["name"]) if spec else type(vit).__name__


@dataclass
class FeatureTable:
    """Features [N, dim] float32 (memory-mapped when read from a cache), labels [N], the
    spec they are (``None`` for the patch tokens [N, gh·gw, D]), the seconds the pass took
    (0 when read from the cache) and whether they came from the cache."""

    features: Tensor
    labels: Tensor
    spec: FeatureSpec | None
    seconds: float
    from_cache: bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dim(self) -> int:
        """The feature width."""
        return int(self.features.shape[-1])


def _part_function(vit: nn.Module, specs: Sequence[FeatureSpec], patches: bool
                   ) -> tuple[Callable[[Tensor], dict[str, Tensor]], int]:
    """What one batch gives (every part the specs need) and the class-token blocks kept."""
    from timm.models.vision_transformer import VisionTransformer

    token_specs = [s for s in specs if s.parts != (PRE_LOGITS,)]
    n_last = max([s.n_last_blocks for s in token_specs if s.class_parts] or [1])
    wanted = {p for s in token_specs for p in s.parts}
    pre_logits = any(s.parts == (PRE_LOGITS,) for s in specs)
    one_pass = isinstance(vit, VisionTransformer)  # token parts and pre-logits from one forward
    prelogit_fn = None
    if pre_logits and not one_pass:
        from narrows.models.heads import pooled_features

        prelogit_fn = pooled_features(vit)

    def parts_of(x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if wanted or patches or (pre_logits and one_pass):
            found = token_parts(vit, x, n_last, patches=patches, pre_logits=pre_logits)
            out.update({k: v for k, v in found.items()
                        if k in wanted or k in ("patches", PRE_LOGITS)})
        if prelogit_fn is not None:
            out[PRE_LOGITS] = prelogit_fn(x).flatten(1)
        return out

    return parts_of, n_last


def backbone_features(backbone: EvalBackbone, data: Any, split: str,
                      spec: FeatureSpec | str | Sequence[FeatureSpec | str], *,
                      cache: str | Path | None, transform: str = "none", patches: bool = False,
                      dtype: str = "float32", device: torch.device | str = "cpu",
                      batch_size: int = 256, workers: int = 0,
                      dist: Distributed = Distributed(), progress: bool = False,
                      say: Callable[[str], None] | None = print,
                      save_every: int = 50) -> dict[str, FeatureTable]:
    """One :class:`FeatureTable` per feature spec of ``backbone`` over split ``split``
    (``"train"``/``"test"``) of ``data`` (a :class:`~narrows.data.DataBundle` or a spec),
    keyed by the spec's canonical text; with ``patches`` also ``"patches"``: the normed
    last-block patch tokens [N, gh·gw, D].

    ``spec``: one spec or several (all from one pass, for the largest ``@N``); a part the
    backbone lacks is a :class:`UserError`. ``transform``: the data's augmentation name used
    to serve the split (``"none"``: its deterministic one). ``cache``: a directory
    (``<cache>/<backbone id>/<data>-<split>-<key>``, a :class:`FeatureStore` of ``dtype``
    numbers, reused by any call with the same backbone, data, split, transform, size,
    normalisation, blocks and patches, resumed after a kill) or ``None`` (in memory). Under
    torchrun with a cache, rank 0 computes and the others read the finished store; a cached
    pass saves its progress every ``save_every`` batches.
    """
    import torch.nn.functional as F

    from narrows.data.feature_store import cache_key, store_directory
    from narrows.data.specs import data_key
    from narrows.data.streaming import Collected, Streaming, stream_dataset
    from narrows.training import Normalizer

    data = eval_data(backbone, data)
    specs = [check_spec(backbone.vit, s) for s in
             ([spec] if isinstance(spec, (str, FeatureSpec)) else list(spec))]
    if not specs and not patches:
        raise UserError("no features asked for", "give at least one feature spec")
    dataset = data.split(split, transform)
    total = len(dataset)
    if total == 0:
        raise UserError(f"the {split} split of {data.info.spec} has no images",
                        "give data with images in both splits")
    vit = backbone.vit.to(device).eval()
    parts_of, n_last = _part_function(vit, specs, patches)
    normalizer = Normalizer(backbone.mean, backbone.std)
    size = backbone.input_size

    @torch.no_grad()
    def run(images: Tensor) -> dict[str, Tensor]:
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False)
        return parts_of(normalizer(images))

    how = Streaming(device=device, batch_size=batch_size, workers=workers, progress=progress,
                    say=say, save_every=save_every)
    facts = {"backbone": backbone.id, "data": data.info.spec, "served": data.info.image_size,
             "split": split,
             "transform": transform, "image_size": size, "mean": list(backbone.mean),
             "std": list(backbone.std), "n_last": n_last, "patches": bool(patches),
             "parts": sorted({p for s in specs for p in s.parts}), "dtype": dtype}
    started = time.perf_counter()
    from_cache = False
    if cache is None:
        state = Collected()
        stream_dataset(dataset, lambda x, y: state.add(run(x), y), state, how,
                       key=facts, desc=f"features {split}")
        parts, labels = state.joined()
    else:
        key = cache_key(**facts)
        directory = store_directory(cache, backbone.id, data_key(data.info.spec), split, key)
        if dist.enabled and not dist.is_main:  # rank 0 fills the store, the others read it
            import torch.distributed as tdist

            tdist.barrier()
        covering = _covering_store(directory.parent, facts, total)
        if covering is not None:
            if say is not None and dist.is_main:
                say(f"features {split}: read from the cache {covering.directory}")
            store = covering
        elif dist.enabled and not dist.is_main:
            raise UserError(f"rank 0 left no finished feature store in {directory}",
                            "give every process the same --cache directory")
        else:
            store = _fill_store(directory, key, facts, dataset, run, how, dtype, total)
        if dist.enabled and dist.is_main:
            import torch.distributed as tdist

            tdist.barrier()
        from_cache = covering is not None
        parts = {name: store.read(name) for name in store.parts}
        labels = store.labels
    seconds = 0.0 if from_cache else time.perf_counter() - started
    out = {s.key: FeatureTable(select(parts, s), labels, s, seconds, from_cache)
           for s in specs}
    if patches:
        out["patches"] = FeatureTable(parts["patches"], labels, None, seconds, from_cache)
    return out


def _covering_store(root: Path, facts: dict[str, Any], total: int) -> Any:
    """A finished store under ``root`` made with the same facts but at least as many class-token
    blocks, a superset of the parts and patches if asked: one pass serves later specs."""
    from narrows.data.feature_store import FeatureStore

    if not root.is_dir():
        return None
    fixed = {k: v for k, v in facts.items() if k not in ("n_last", "parts", "patches")}
    for directory in sorted(root.iterdir()):
        meta = FeatureStore._read_meta(directory)
        if not meta or not meta.get("complete") or meta.get("total") != total:
            continue
        found = meta.get("facts", {})
        if (all(found.get(k) == v for k, v in fixed.items())
                and found.get("n_last", 0) >= facts["n_last"]
                and set(found.get("parts", ())) >= set(facts["parts"])
                and (found.get("patches") or not facts["patches"])):
            return FeatureStore(directory, meta)
    return None


def _fill_store(directory: Path, key: str, facts: dict[str, Any], dataset: Any,
                run: Callable[[Tensor], dict[str, Tensor]], how: Any, dtype: str,
                total: int) -> Any:
    from narrows.data.feature_store import FeatureStore
    from narrows.data.streaming import stream_dataset

    first_images = torch.as_tensor(dataset[0][0]).unsqueeze(0).to(how.device)
    shapes = {name: tuple(value.shape[1:]) for name, value in run(first_images).items()}
    store = FeatureStore.open(directory, key=key, total=total, shapes=shapes, dtype=dtype,
                              facts=facts)
    resume = directory / "partial.pt"
    how = dataclasses.replace(how, resume=resume)
    stream_dataset(dataset, lambda x, y: store.append(run(x), y), store, how, key=facts,
                   desc=f"features {facts['split']}")
    store.finish()
    return store


def eval_data(backbone: EvalBackbone, data: Any) -> Any:
    """``data`` as a :class:`~narrows.data.DataBundle`: as given, or the spec loaded with its
    images served at ``backbone``'s input size where the data kind allows it."""
    if not isinstance(data, str):
        return data
    from narrows.data import load

    return load(data, image_size=backbone.input_size)


def open_subject(subject: Any, *, seed: int = 0, say: Callable[[str], None] | None = print,
                 need_data: bool = True) -> tuple[EvalBackbone, Any]:
    """The backbone and the data (a :class:`~narrows.data.DataBundle`) that ``subject`` (an
    :class:`~narrows.ssl.eval_options.EvalSubject`, or any object with its fields) names: its
    ``data``, else the data the checkpoint was trained on; images served at the backbone's
    input size where the data kind allows it. ``seed`` draws a random backbone; ``say`` gets
    one line describing what was loaded (and any notes). Without ``need_data`` (image files
    given instead) the data is ``None`` when none is named."""

    backbone = load_eval_backbone(subject.checkpoint, model=subject.model,
                                  model_kwargs=subject.model_kwargs,
                                  class_tokens=subject.class_tokens, which=subject.which,
                                  seed=seed, image_size=subject.image_size)
    spec = subject.data or backbone.data_spec
    if not spec and not need_data:
        bundle = None
    elif not spec:
        raise UserError(f"no data given and {backbone.checkpoint or 'a random ViT'} names none",
                        "pass `data` SPEC (e.g. shapes, imagenet:/data/imagenet)")
    else:
        bundle = eval_data(backbone, spec)
    if say is not None:
        say(backbone.describe())
        for note in backbone.notes:
            say(f"note: {note}")
    return backbone, bundle
