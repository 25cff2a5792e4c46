"""Upstream UDI/DINO checkpoints in, plain timm ViT backbones out (spec §8, §9.3, §10.12).

* :func:`read_upstream` reads the official ``checkpoint.pth`` without ever running pickled code:
  ``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allowed besides tensors and
  containers (upstream pickles its args as a Namespace, which plain ``weights_only`` refuses on
  torch ≥ 2.6: §10.12). ``module.`` prefixes are stripped.
* :func:`upstream_to_narrows` maps upstream keys onto :class:`~narrows.ssl.model.UDIModel`:
  ``backbone.backbone.*`` → ``backbone.*`` (the [1, 2, D] ``cls_token`` becomes timm's
  ``cls_token`` and ``reg_token``), ``backbone.attn.*`` → ``srs.*``, ``backbone.norm1.*`` →
  ``norm1.*``, ``head.0.*`` → ``head.*`` (``head.1``/``head.2`` are the same tensors saved again).
  DINO's own full checkpoints (``backbone.*``, ``head.*``) map one to one.
* :func:`load_upstream` builds the matching model from the checkpoint's shapes and args and loads
  it strictly. Upstream's DINO-style position interpolation (+0.1) differs slightly from timm's,
  so outputs agree with upstream's exactly only at the training resolution.
* :func:`export_backbone` / :func:`save_export` write a clean timm ViT state dict, keeping both
  class tokens (``reg_tokens=1``) or dropping ``cls+`` (§9.3).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.models.vit_tokens import CREATE_SPEC, create_vit
from narrows.ssl.model import UDIModel

StateDict = dict[str, Tensor]

#: upstream ``--arch`` → (timm name, heads); upstream's SRS attention always has 6 heads
UPSTREAM_ARCHS = {"vit_tiny": ("vit_tiny_patch16_224", 3), "vit_small": ("vit_small_patch16_224", 6),
                  "vit_base": ("vit_base_patch16_224", 12)}
UPSTREAM_SRS_HEADS = 6


# -- reading -------------------------------------------------------------------------------------

def _strip(state: Mapping[str, Any]) -> StateDict:
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def read_upstream(path: str | Path) -> dict[str, Any]:
    """Read the official UDI (or DINO) training checkpoint at ``path`` safely.

    Returns ``student`` and ``teacher`` state dicts (upstream key names, ``module.`` stripped; an
    absent one is ``None``), ``args`` (a plain dict), ``epoch`` (completed epochs or ``None``),
    ``centers`` ([levels, K] or ``None``) and ``layout`` (``"udi"`` or ``"dino"``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", "check the path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe globals, corrupt files: torch raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"refused to read {path}: it is not a plain UDI/DINO checkpoint "
                        f"({first[:200]})", "only tensors, numbers, strings, containers and "
                        "argparse.Namespace are loaded; re-save the file from trusted code "
                        "holding only those") from exc
    if not isinstance(obj, Mapping) or not ({"student", "teacher"} & set(obj)):
        raise UserError(f"{path} has no 'student' or 'teacher' entry",
                        "give the checkpoint.pth written by UDI's or DINO's training script")
    states = {}
    for which in ("student", "teacher"):
        value = obj.get(which)
        states[which] = _strip(value) if isinstance(value, Mapping) else None
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    args = dict(args) if isinstance(args, Mapping) else {}
    centers = None
    for loss_key, center_key in (("udi_loss", "centering.center"), ("dino_loss", "center")):
        entry = obj.get(loss_key)
        if isinstance(entry, Mapping) and isinstance(entry.get(center_key), Tensor):
            centers = entry[center_key]
            break
    some = states["teacher"] or states["student"] or {}
    layout = "udi" if any(k.startswith("backbone.backbone.") for k in some) else "dino"
    epoch = obj.get("epoch")
    return {"student": states["student"], "teacher": states["teacher"], "args": args,
            "epoch": int(epoch) if isinstance(epoch, int) else None, "centers": centers,
            "layout": layout}


# -- key mapping ---------------------------------------------------------------------------------

def _head_key(rest: str) -> str:
    # torch's newer weight-norm parametrisation → the classic names used by UDIModel
    return (rest.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"))


def upstream_to_narrows(state: Mapping[str, Tensor]) -> StateDict:
    """Map one upstream UDI or DINO state dict (``module.`` allowed) onto ``UDIModel`` keys."""
    state = _strip(state)
    udi = any(k.startswith("backbone.backbone.") for k in state)
    out: StateDict = {}
    heads: dict[str, StateDict] = {}
    unknown = []
    for key, value in state.items():
        if udi and key.startswith("backbone.backbone."):
            rest = key[len("backbone.backbone."):]
        elif udi and key.startswith("backbone.attn."):
            out["srs." + key[len("backbone.attn."):]] = value
            continue
        elif udi and key.startswith("backbone.norm1."):
            out["norm1." + key[len("backbone.norm1."):]] = value
            continue
        elif not udi and key.startswith("backbone."):
            rest = key[len("backbone."):]
        elif (match := re.match(r"head\.(\d+)\.(.+)$", key)) and udi:
            heads.setdefault(match.group(1), {})[_head_key(match.group(2))] = value
            continue
        elif key.startswith("head.") and not udi:
            out["head." + _head_key(key[len("head."):])] = value
            continue
        else:
            unknown.append(key)
            continue
        if rest == "cls_token":
            out["backbone.cls_token"] = value[:, :1]
            if value.shape[1] == 2:
                out["backbone.reg_token"] = value[:, 1:2]
            elif value.shape[1] != 1:
                raise UserError(f"the checkpoint has {value.shape[1]} class tokens",
                                "only 1 (DINO) or 2 (UDI) are supported")
        else:
            out["backbone." + rest] = value
    if unknown:
        raise UserError(f"the checkpoint has keys of no known UDI/DINO layout: {unknown[:4]}",
                        "give a checkpoint written by UDI's or DINO's training script")
    if heads:
        first = heads.pop(min(heads, key=int))
        for index, other in heads.items():
            same = other.keys() == first.keys() and all(torch.equal(other[k], first[k])
                                                         for k in first)
            if not same:
                raise UserError(f"the checkpoint's head.{index} differs from head.0 (decoupled "
                                "heads)", "only the shared head of the released code is supported")
        out.update({"head." + k: v for k, v in first.items()})
    return out


def _architecture(state: StateDict, args: Mapping[str, Any]) -> dict[str, Any]:
    """The build arguments of the model a mapped state dict came from."""
    try:
        cls = state["backbone.cls_token"]
        n_c = 1 + ("backbone.reg_token" in state)
        dim = cls.shape[-1]
        patch = state["backbone.patch_embed.proj.weight"].shape[-1]
        grid = math.isqrt(state["backbone.pos_embed"].shape[1] - n_c)
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("backbone.blocks."))
        mlp_ratio = state["backbone.blocks.0.mlp.fc1.weight"].shape[0] / dim
        out_dim, bottleneck = state["head.last_layer.weight_v"].shape
    except (KeyError, ValueError) as exc:
        raise UserError(f"the checkpoint lacks the ViT/head tensor {exc}",
                        "give a complete UDI/DINO training checkpoint") from exc
    linears = sorted((k for k in state if re.match(r"head\.mlp\.(\d+\.)?weight$", k)
                      and state[k].ndim == 2), key=lambda k: int(k.split(".")[2]) if
                     k.count(".") == 3 else 0)
    hidden = state[linears[0]].shape[0] if len(linears) > 1 else 2048
    use_bn = any(k.startswith("head.mlp.") and k.endswith("running_mean") for k in state)
    return {"num_class_tokens": n_c, "embed_dim": dim, "patch_size": patch,
            "img_size": grid * patch, "depth": depth, "mlp_ratio": mlp_ratio,
            "out_dim": out_dim, "head_bottleneck": bottleneck, "head_layers": len(linears),
            "head_hidden": hidden, "use_bn_in_head": use_bn,
            "patch_level": "srs.qkv.weight" in state,
            "norm_last_layer": bool(args.get("norm_last_layer", True))}


def load_upstream(path: str | Path, *, which: Literal["teacher", "student"] = "teacher",
                  name: str | None = None, **timm_kwargs: Any) -> tuple[UDIModel, dict[str, Any]]:
    """The ``which`` network of the checkpoint at ``path`` as a strictly loaded ``UDIModel``, with
    what :func:`read_upstream` returned. ``name``/``timm_kwargs`` override the ViT that the
    args' ``arch`` names (widths, depth, patch and size are read from the tensors)."""
    found = read_upstream(path)
    if found[which] is None:
        raise UserError(f"{path} has no {which} weights", "pick the other network")
    state = upstream_to_narrows(found[which])
    args = found["args"]
    arch = _architecture(state, args)
    arch_name = str(args.get("arch", "vit_small"))
    if name is None:
        if arch_name not in UPSTREAM_ARCHS:
            raise UserError(f"unknown upstream architecture {arch_name!r}",
                            "give the timm model name (name=...)")
        name, heads = UPSTREAM_ARCHS[arch_name]
        timm_kwargs.setdefault("num_heads", heads)
    vit_kwargs = {k: arch[k] for k in ("embed_dim", "patch_size", "depth", "mlp_ratio")}
    vit_kwargs.update(timm_kwargs)
    vit = create_vit(name, num_class_tokens=arch["num_class_tokens"], img_size=arch["img_size"],
                     **vit_kwargs)
    srs_heads = UPSTREAM_SRS_HEADS if found["layout"] == "udi" else None
    model = UDIModel(vit, out_dim=arch["out_dim"], num_class_tokens=arch["num_class_tokens"],
                     patch_level=arch["patch_level"], head_hidden=arch["head_hidden"],
                     head_bottleneck=arch["head_bottleneck"], head_layers=arch["head_layers"],
                     norm_last_layer=arch["norm_last_layer"],
                     use_bn_in_head=arch["use_bn_in_head"],
                     srs_heads=srs_heads if arch["patch_level"] else None)
    from narrows.models import load_state_dict_strict

    load_state_dict_strict(model, state, f"the {which} weights of {path}")  # lists any mismatch
    return model, found


# -- export --------------------------------------------------------------------------------------

def _pick_state(model_or_state: Any, which: str) -> tuple[StateDict, dict[str, Any] | None]:
    if isinstance(model_or_state, nn.Module):
        spec = getattr(getattr(model_or_state, "backbone", model_or_state), CREATE_SPEC, None)
        return model_or_state.state_dict(), spec
    if not isinstance(model_or_state, Mapping):
        raise UserError(f"cannot export a {type(model_or_state).__name__}",
                        "give a UDIModel, its state dict or a training checkpoint")
    state: Any = model_or_state
    if "teacher" in state or "student" in state:
        state = state.get(which)
        if not isinstance(state, Mapping):
            raise UserError(f"the checkpoint has no {which} weights", "pick the other network")
    state = _strip(state)
    if any(k.startswith(("backbone.backbone.", "backbone.attn.")) for k in state):
        state = upstream_to_narrows(state)
    return state, None


def export_backbone(model_or_state: Any, *, which: Literal["teacher", "student"] = "teacher",
                    class_tokens: Literal["keep", "drop"] = "keep") -> tuple[StateDict, str]:
    """A plain timm ViT state dict of the backbone, and a note on how to load it.

    ``model_or_state``: a ``UDIModel``, its state dict, or a checkpoint dict with ``teacher``/
    ``student`` entries (narrows' or upstream's layout; ``which`` picks one). ``class_tokens``
    ``keep``: timm keys
    with ``reg_token`` = ``cls+`` (build with ``reg_tokens=1``); ``drop``: ``cls_token`` only and
    position rows {0} ∪ {2 …} (a standard one-class-token ViT).
    """
    if class_tokens not in ("keep", "drop"):
        raise UserError(f"class_tokens={class_tokens!r}", "use keep or drop")
    state, spec = _pick_state(model_or_state, which)
    out = {k[len("backbone."):]: v.detach().clone().contiguous()
           for k, v in state.items() if k.startswith("backbone.")}
    if "cls_token" not in out or "pos_embed" not in out:
        raise UserError("the weights hold no ViT backbone with a class token",
                        "give a UDIModel, its state dict or a UDI/DINO checkpoint")
    n_c = 1 + ("reg_token" in out)
    build = f"timm.create_model({spec['name']!r}, num_classes=0, ...)" if spec else \
        "timm.create_model(<the ViT's name>, num_classes=0, ...)"
    if n_c == 1:
        note = f"one class token (cls) exported as is; load with {build}"
    elif class_tokens == "keep":
        note = ("both class tokens kept: cls_token = cls (token 0), reg_token = cls+ (token 1); "
                f"load with {build[:-4]}reg_tokens=1, ...); heads reading token 0 see cls")
    else:
        del out["reg_token"]
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1).contiguous()
        note = ("cls+ dropped: cls_token = cls, position rows {0} ∪ {2…}; a standard "
                f"one-class-token ViT, load with {build}")
    return out, note


def export_metadata(model: UDIModel, class_tokens: Literal["keep", "drop"]) -> dict[str, Any]:
    """Metadata for :func:`save_export` of ``model``'s backbone exported with ``class_tokens``:
    the timm name, the kwargs of ``timm.create_model`` and the class tokens kept."""
    spec = getattr(model.backbone, CREATE_SPEC, None)
    if spec is None:
        raise UserError("the backbone was not built by narrows.models.vit_tokens.create_vit",
                        "give the timm name and arguments yourself")
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "drop_path_rate"}
    kwargs["num_classes"] = 0
    n_c = spec["num_class_tokens"]
    if n_c == 2 and class_tokens == "keep":
        kwargs["reg_tokens"] = 1
    tokens = "cls" if n_c == 1 or class_tokens == "drop" else "cls,cls+"
    return {"timm_name": spec["name"], "timm_kwargs": kwargs, "class_tokens": tokens}


def save_export(path: str | Path, state: Mapping[str, Tensor], metadata: Mapping[str, Any]) -> Path:
    """Write the exported backbone ``state`` to ``path`` (``.safetensors``) with ``metadata``
    (non-string values stored as JSON); returns ``path``."""
    from safetensors.torch import save

    from narrows.runs.files import atomic_write_bytes

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path} does not end in .safetensors", "name the file *.safetensors")
    text = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=text)
    return atomic_write_bytes(path, data)


# -- layouts of the files an evaluation reads ----------------------------------------------------

#: every checkpoint layout :func:`detect_layout` recognises, in the order it checks them
LAYOUTS = ("narrows-card", "narrows-ssl", "udi-full", "dino-full", "udi-backbone", "dino-backbone")
_WRAPPERS = ("teacher", "state_dict", "model", "student")


def _read_any(path: Path) -> Any:
    """The object saved at ``path`` (a safetensors file: ``{"tensors": …, "metadata": …}``),
    read without running pickled code (``argparse.Namespace`` allowed, as upstream saves it)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            tensors = load_file(path, device="cpu")
            with safe_open(path, framework="pt", device="cpu") as fh:
                metadata = dict(fh.metadata() or {})
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise UserError(f"cannot read {path} ({exc})", "check the file") from exc
        return {"__safetensors__": True, "tensors": tensors, "metadata": metadata}
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unsafe globals, corrupt files: torch raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"refused to read {path} ({first[:200]})", "only tensors, numbers, "
                        "strings, containers and argparse.Namespace are loaded") from exc


def _tensors(obj: Any) -> StateDict | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return _strip(obj)
    return None


def _backbone_state(obj: Any, which: str = "teacher") -> tuple[StateDict | None, str | None]:
    """The tensors of a backbone-only file (the ``which``/``teacher``/``state_dict``/``model``
    wrapper opened), and the wrapper's name."""
    if isinstance(obj, Mapping) and obj.get("__safetensors__"):
        return _strip(obj["tensors"]), None
    direct = _tensors(obj)
    if direct is not None:
        return direct, None
    if isinstance(obj, Mapping):
        for name in (which, *_WRAPPERS):
            inner = _tensors(obj.get(name))
            if inner is not None:
                return inner, name
    return None, None


def _shape_of(state: Mapping[str, Tensor], key: str) -> tuple[int, ...] | None:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _layout_of(obj: Any, which: str = "teacher") -> str | None:
    from narrows.models.checkpoints import CARD_KEY

    if isinstance(obj, Mapping) and obj.get("__safetensors__"):
        if CARD_KEY in obj["metadata"]:
            return "narrows-card"
    elif isinstance(obj, Mapping):
        if CARD_KEY in obj:
            return "narrows-card"
        if str(obj.get("format", "")).startswith("narrows.ssl_"):
            return "narrows-ssl"
        nets = [_strip(obj[k]) for k in ("teacher", "student") if isinstance(obj.get(k), Mapping)]
        if nets and any(k.startswith("backbone.backbone.") for k in nets[0]):
            return "udi-full"
        if nets and "backbone.cls_token" in nets[0] and any(k.startswith("head.")
                                                            for k in nets[0]):
            return "dino-full"
    state, _ = _backbone_state(obj, which)
    if state is None:
        return None
    cls = _shape_of(state, "backbone.cls_token")
    if (cls and len(cls) == 3 and cls[1] in (1, 2) and "backbone.pos_embed" in state
            and any(k.startswith("backbone.blocks.") for k in state)
            and not any(k.startswith("head.") for k in state)):
        return "udi-backbone"
    cls = _shape_of(state, "cls_token")
    if (cls and len(cls) == 3 and cls[:2] == (1, 1) and "pos_embed" in state
            and "patch_embed.proj.weight" in state
            and any(k.startswith("blocks.") for k in state)):
        return "dino-backbone"
    return None


def _first_keys(obj: Any) -> str:
    if isinstance(obj, Mapping) and obj.get("__safetensors__"):
        obj = obj["tensors"]
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = list(obj)[:6]
    return ", ".join(map(str, keys)) + (" …" if len(obj) > 6 else "")


def no_layout_error(path: str | Path, obj: Any) -> UserError:
    """The one error for a file that fits none of :data:`LAYOUTS`."""
    return UserError(
        f"{path} fits no known checkpoint layout (first keys: {_first_keys(obj)})",
        "give one of: narrows-card (an 'ssl export' file or a 'narrows train' checkpoint), "
        "narrows-ssl (an 'ssl train' checkpoint.pt), udi-full / dino-full (an official "
        "training checkpoint.pth with student and teacher), udi-backbone (the output of UDI's "
        "extract_backbone_weights_for_finetuning.py), dino-backbone (a DINO release such as "
        "dino_deitsmall16_pretrain.pth: timm ViT keys)")


def detect_layout(path: str | Path, *, which: Literal["teacher", "student"] = "teacher") -> str:
    """Which of :data:`LAYOUTS` the checkpoint file at ``path`` has (``which`` picks the
    wrapper of a backbone-only file saved under ``teacher``/``student``); a
    :class:`UserError` naming its first keys when it fits none."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", "check the path")
    obj = _read_any(path)
    layout = _layout_of(obj, which)
    if layout is None:
        raise no_layout_error(path, obj)
    return layout


def backbone_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ViT build arguments read from a timm-keyed backbone state dict: class tokens,
    embed_dim, depth, patch_size, img_size (from the position rows), mlp_ratio, qkv_bias."""
    try:
        n_c = int(state["cls_token"].shape[1]) + ("reg_token" in state)
        dim = int(state["cls_token"].shape[-1])
        patch = int(state["patch_embed.proj.weight"].shape[-1])
        grid = math.isqrt(int(state["pos_embed"].shape[1]) - n_c)
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except (KeyError, ValueError) as exc:
        raise UserError(f"the backbone lacks the ViT tensor {exc}",
                        "give a complete ViT backbone") from exc
    return {"num_class_tokens": n_c, "embed_dim": dim, "patch_size": patch,
            "img_size": grid * patch, "depth": depth, "mlp_ratio": mlp_ratio,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state}


def backbone_only_state(path: str | Path, layout: str, *,
                        which: Literal["teacher", "student"] = "teacher"
                        ) -> tuple[StateDict, list[str]]:
    """The timm ViT state dict of the backbone-only file at ``path`` (``layout``
    ``udi-backbone`` or ``dino-backbone``), and notes on what was changed: UDI's SRS keys
    (``attn.*``, ``norm1.*``) dropped, its [1, 2, D] class tokens split into
    ``cls_token``/``reg_token``."""
    obj = _read_any(Path(path))
    state, wrapper = _backbone_state(obj, which)
    if state is None:
        raise no_layout_error(path, obj)
    notes = [f"weights under '{wrapper}'"] if wrapper else []
    if layout == "dino-backbone":
        return dict(state), notes
    if layout != "udi-backbone":
        raise UserError(f"layout {layout!r} is not a backbone-only layout",
                        "use udi-backbone or dino-backbone")
    out: StateDict = {}
    dropped = []
    for key, value in state.items():
        if key.startswith("backbone."):
            out[key[len("backbone."):]] = value
        elif key.startswith(("attn.", "norm1.")):
            dropped.append(key)
        else:
            raise UserError(f"{path}: key {key!r} is not part of a UDI backbone",
                            "give the output of extract_backbone_weights_for_finetuning.py")
    if dropped:
        notes.append(f"{len(dropped)} SRS tensors (attn.*, norm1.*) dropped: only pretraining "
                     "uses them")
    cls = out.pop("cls_token")
    out["cls_token"] = cls[:, :1]
    if cls.shape[1] == 2:
        out["reg_token"] = cls[:, 1:2]
        notes.append("class tokens [1, 2, D] split into cls (token 0) and cls+ (token 1)")
    return out, notes


def load_backbone_only(path: str | Path, layout: str, *, name: str | None = None,
                       which: Literal["teacher", "student"] = "teacher",
                       **timm_kwargs: Any) -> tuple[nn.Module, list[str]]:
    """The strictly loaded timm ViT of the backbone-only file at ``path`` and notes.

    The architecture is read from the tensors (:func:`backbone_architecture`) and built with
    :func:`~narrows.models.vit_tokens.create_vit` (``name``, default ``vit_small_patch16_224``);
    heads = embed_dim // 64 unless ``timm_kwargs`` give ``num_heads`` (the tensors cannot tell).
    ``layout`` is ``udi-backbone`` or ``dino-backbone``; ``which`` picks a wrapper."""
    from narrows.models import load_state_dict_strict

    state, notes = backbone_only_state(path, layout, which=which)
    arch = backbone_architecture(state)
    kwargs = {k: arch[k] for k in ("embed_dim", "patch_size", "depth", "mlp_ratio", "qkv_bias")}
    kwargs["num_heads"] = max(1, arch["embed_dim"] // 64)
    kwargs.update(timm_kwargs)
    img_size = int(kwargs.pop("img_size", arch["img_size"]))
    vit = create_vit(name or "vit_small_patch16_224", num_class_tokens=arch["num_class_tokens"],
                     img_size=img_size, **kwargs)
    load_state_dict_strict(vit, state, f"the backbone in {path}")
    if "num_heads" not in timm_kwargs:
        notes.append(f"{kwargs['num_heads']} heads assumed (embed_dim // 64; set num_heads= in "
                     "the model arguments otherwise)")
    return vit, notes
