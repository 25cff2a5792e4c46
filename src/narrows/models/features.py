"""Which features of a model a probe reads: class tokens, the average patch token, pre-logits.

A :class:`FeatureSpec` names them in text (``"cls"``, ``"cls|cls+"``, ``"cls|avgpool@4"``,
``"pre-logits"``). For a timm ViT, :func:`token_parts` computes every part in one forward pass
(all after the ViT's final norm): the class token ``cls`` and, on a 2-token (UDI) ViT, ``cls+``
of the last ``n`` blocks; ``avgpool``, the mean of the last block's patch tokens (never a class
or register token); optionally the patch tokens themselves. :func:`select` then concatenates
what a spec asks for, so one pass serves several specs. ``pre-logits`` is the input of any
model's classifier (:func:`narrows.models.heads.pooled_features`), CNNs included.

DINO interleaves the class tokens of the last blocks with the average token; here they are
concatenated (cls blocks oldest first, then cls+ blocks, then avgpool) — a permutation of the
same numbers, so a linear probe is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.models.vit_tokens import _embed

#: the token parts a spec may join with '|', in the order :func:`select` concatenates them
PARTS = ("cls", "cls+", "avgpool")
PRE_LOGITS = "pre-logits"


@dataclass(frozen=True)
class FeatureSpec:
    """Feature parts (a subset of :data:`PARTS`, or ``("pre-logits",)``) and, for the class
    tokens, how many of the last blocks are concatenated (each through the final norm)."""

    parts: tuple[str, ...] = ("cls",)
    n_last_blocks: int = 1

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        if not parts:
            raise UserError("a feature spec needs at least one part",
                            f"give parts among {', '.join(PARTS)} or {PRE_LOGITS}")
        if parts == (PRE_LOGITS,):
            if self.n_last_blocks != 1:
                raise UserError("pre-logits takes no @N", "write 'pre-logits' alone")
        else:
            bad = [p for p in parts if p not in PARTS]
            if bad:
                raise UserError(f"unknown feature part {bad[0]!r}",
                                f"join parts among {', '.join(PARTS)} with '|', or give "
                                f"{PRE_LOGITS} alone")
            if len(set(parts)) != len(parts):
                raise UserError(f"feature part repeated in {'|'.join(parts)}",
                                "name each part once")
            parts = tuple(p for p in PARTS if p in parts)
        if not (isinstance(self.n_last_blocks, int) and self.n_last_blocks >= 1):
            raise UserError(f"@{self.n_last_blocks}: the number of last blocks must be >= 1",
                            "write e.g. 'cls@4'")
        object.__setattr__(self, "parts", parts)
        if not self.class_parts:  # @N counts class-token blocks: without them it means nothing
            object.__setattr__(self, "n_last_blocks", 1)

    @classmethod
    def parse(cls, text: str | FeatureSpec) -> FeatureSpec:
        """The spec written as ``text``: parts joined by '|', optionally ``@N`` (last N blocks'
        class tokens), e.g. ``"cls|avgpool@4"``; or ``"pre-logits"``."""
        if isinstance(text, FeatureSpec):
            return text
        body, at, n = str(text).strip().partition("@")
        if at and not n.isdigit():
            raise UserError(f"feature spec {text!r}: the number after @ must be a whole number",
                            "write e.g. 'cls@4'")
        return cls(tuple(p.strip() for p in body.split("|")), int(n) if at else 1)

    @property
    def key(self) -> str:
        """Canonical text (parts in :data:`PARTS` order; ``@N`` only when N > 1): cache keys
        and result rows."""
        body = "|".join(self.parts)
        return body if self.n_last_blocks == 1 else f"{body}@{self.n_last_blocks}"

    @property
    def class_parts(self) -> tuple[str, ...]:
        """The parts that are class tokens (``cls``, ``cls+``)."""
        return tuple(p for p in self.parts if p in ("cls", "cls+"))

    def __str__(self) -> str:
        return self.key


def _timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def class_tokens(model: nn.Module) -> int:
    """The class tokens of the timm ViT ``model``: 2 for a narrows 2-token ViT (``cls`` and
    ``cls+``, built with exactly one register token), 1 for a plain ViT (real registers, when
    there are several, are not class tokens), 0 for a ViT without a class token."""
    if not _timm_vit(model):
        raise UserError(f"{type(model).__name__} is not a timm VisionTransformer, so it has no "
                        "class tokens", f"use the '{PRE_LOGITS}' features for other models")
    if getattr(model, "cls_token", None) is None:
        return 0
    return 2 if getattr(model, "num_reg_tokens", 0) == 1 else 1


def available_parts(model: nn.Module) -> tuple[str, ...]:
    """The parts of :data:`PARTS` that ``model`` has (plus ``pre-logits`` for every model)."""
    if not _timm_vit(model):
        return (PRE_LOGITS,)
    tokens = {0: (), 1: ("cls",), 2: ("cls", "cls+")}[class_tokens(model)]
    return (*tokens, "avgpool", PRE_LOGITS)


def spec_problem(model: nn.Module, spec: FeatureSpec | str) -> str | None:
    """Why ``model`` cannot give the features ``spec`` names, or ``None`` when it can."""
    spec = FeatureSpec.parse(spec)
    have = available_parts(model)
    missing = [p for p in spec.parts if p not in have]
    if missing:
        why = {"cls+": "only a 2-token (UDI) ViT has cls+",
               "cls": "it has no class token"}.get(missing[0], "it is not a timm ViT")
        return (f"{type(model).__name__} has no '{missing[0]}' feature ({why}); it has "
                f"{', '.join(have)}")
    if spec.class_parts:
        depth = len(model.blocks)
        if spec.n_last_blocks > depth:
            return f"'{spec.key}' asks for the last {spec.n_last_blocks} blocks of a ViT with {depth}"
    return None


def check_spec(model: nn.Module, spec: FeatureSpec | str) -> FeatureSpec:
    """``spec`` parsed, or a :class:`UserError` if ``model`` lacks a part it names."""
    spec = FeatureSpec.parse(spec)
    problem = spec_problem(model, spec)
    if problem:
        depth = len(getattr(model, "blocks", ()))
        if spec.class_parts and spec.n_last_blocks > depth > 0:
            raise UserError(problem, f"give @N with N <= {depth}, e.g. "
                            f"{FeatureSpec(spec.parts, depth).key}")
        have = ", ".join(p for p in available_parts(model) if p != PRE_LOGITS)
        raise UserError(problem, f"ask for the parts it has ({have or PRE_LOGITS})")
    return spec


def token_parts(model: nn.Module, x: Tensor, n_last: int = 1, *,
                patches: bool = False, pre_logits: bool = False) -> dict[str, Tensor]:
    """Every token feature of the timm ViT ``model`` for images ``x`` [B, 3, H, W], in one
    forward pass, all after the final norm.

    ``{"cls": [B, n_last, D], "cls+": [B, n_last, D], "avgpool": [B, D], "patches": [B, N, D]}``:
    ``cls``/``cls+`` are the class tokens of the last ``n_last`` blocks (oldest first; ``cls+``
    only for a 2-token ViT, ``cls`` only with a class token); ``avgpool`` is the mean of the
    last block's patch tokens (all prefix tokens — class and register — excluded; through
    ``fc_norm`` for ViTs that have one); ``patches`` those tokens, only with ``patches=True``;
    with ``pre_logits=True`` also ``"pre-logits"``: the model's own pooled head input
    (``forward_head(..., pre_logits=True)``) from the same pass.
    """
    n_c = class_tokens(model)
    depth = len(model.blocks)
    if not 1 <= n_last <= depth:
        raise UserError(f"asked for the last {n_last} blocks of a ViT with {depth}",
                        f"give a number between 1 and {depth}")
    prefix = int(model.num_prefix_tokens)
    h = _embed(model, x)
    kept: list[Tensor] = []
    for index, block in enumerate(model.blocks):
        h = block(h)
        if n_c and depth - n_last <= index < depth - 1:
            kept.append(model.norm(h[:, :n_c]))
    normed = model.norm(h)
    out: dict[str, Tensor] = {}
    if n_c:
        kept.append(normed[:, :n_c])
        tokens = torch.stack(kept, dim=1)  # [B, n_last, n_c, D]
        out["cls"] = tokens[:, :, 0]
        if n_c == 2:
            out["cls+"] = tokens[:, :, 1]
    patch_tokens = normed[:, prefix:]
    pooled = patch_tokens.mean(dim=1)
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, nn.Identity):
        pooled = fc_norm(pooled)
    out["avgpool"] = pooled
    if patches:
        out["patches"] = patch_tokens
    if pre_logits:
        out[PRE_LOGITS] = model.forward_head(normed, pre_logits=True).flatten(1)
    return out


def select(parts: Mapping[str, Tensor], spec: FeatureSpec | str) -> Tensor:
    """The features ``spec`` names, [B, dim], out of ``parts`` (:func:`token_parts`' output, or
    a cached copy with at least ``spec.n_last_blocks`` blocks: the newest are taken): cls
    blocks (oldest to newest), then cls+ blocks, then avgpool; ``pre-logits`` as stored."""
    spec = FeatureSpec.parse(spec)
    pieces = []
    for part in spec.parts:
        if part not in parts:
            raise UserError(f"the features hold no '{part}' (they have "
                            f"{', '.join(sorted(parts)) or 'nothing'})",
                            "ask for parts the model has (a 1-token ViT: cls, avgpool)")
        value = parts[part]
        if part in ("cls", "cls+"):
            if value.shape[1] < spec.n_last_blocks:
                raise UserError(f"'{spec.key}' needs the class tokens of {spec.n_last_blocks} "
                                f"blocks; the features hold {value.shape[1]}",
                                "compute the features with more last blocks")
            value = value[:, value.shape[1] - spec.n_last_blocks:]
        pieces.append(value.flatten(1))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)  # one: no copy


def feature_dim(model: nn.Module, spec: FeatureSpec | str) -> int:
    """The width of ``spec``'s features of ``model``."""
    spec = check_spec(model, spec)
    if spec.parts == (PRE_LOGITS,):
        from narrows.models.heads import find_classifier

        try:
            _, head = find_classifier(model)
            if isinstance(head, nn.Linear):
                return int(head.in_features)
        except UserError:
            pass
        if hasattr(model, "num_features"):
            return int(model.num_features)
        raise UserError(f"the pre-logit width of {type(model).__name__} is unknown",
                        "run the feature function once and read its width")
    width = int(model.embed_dim)
    return sum(width * (spec.n_last_blocks if p != "avgpool" else 1) for p in spec.parts)


def feature_function(model: nn.Module, spec: FeatureSpec | str) -> Callable[[Tensor], Tensor]:
    """``x -> [B, dim]``: ``spec``'s features of ``model`` (a token ViT: :func:`select` of
    :func:`token_parts`; ``pre-logits``: :func:`narrows.models.heads.pooled_features`, any
    model). No ``no_grad`` or ``eval`` is applied: the caller decides."""
    spec = check_spec(model, spec)
    if spec.parts == (PRE_LOGITS,):
        from narrows.models.heads import pooled_features

        return pooled_features(model)
    n_last = spec.n_last_blocks if spec.class_parts else 1

    def features(x: Tensor) -> Tensor:
        return select(token_parts(model, x, n_last), spec)

    return features


def patch_grid(model: nn.Module, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """The patch-token grid (H / P, W / P) of the ViT ``model`` for square images of side
    ``image_size`` (or (H, W)); a :class:`UserError` when the patch size P does not divide it."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise UserError(f"{type(model).__name__} has no patch embedding",
                        "use a timm VisionTransformer")
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % ph or w % pw:
        raise UserError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}",
                        f"use a size divisible by {ph}, e.g. {max(ph, h // ph * ph)}")
    return h // ph, w // pw


def usable_features(model: nn.Module, features: Sequence[str],
                    say: Callable[[str], None] | None = None) -> list[str]:
    """The specs of ``features`` that ``model`` can give, canonical and without repeats; the
    others are dropped with a note to ``say`` (none left: a :class:`UserError` naming the
    parts it has)."""
    kept: list[str] = []
    for text in features:
        spec = FeatureSpec.parse(text)
        problem = spec_problem(model, spec)
        if problem:
            if say:
                say(f"note: skipping feature '{spec.key}': {problem}")
        elif spec.key not in kept:
            kept.append(spec.key)
    if not kept:
        have = " ".join(available_parts(model))
        raise UserError(f"the backbone has none of the features {', '.join(features)}",
                        f"ask for features it has: `features` {have}")
    return kept
