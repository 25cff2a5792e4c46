"""Token-level access to timm ViTs with one or two class tokens (``cls`` and ``cls+``).

UDI's backbone is a plain ViT whose sequence is ``[cls, cls+, p_1 … p_N]``, each class token
with its own positional row. timm builds exactly that with ``class_token=True, reg_tokens=1``
(the register token plays ``cls+``), so no ViT is re-implemented here:

* :func:`create_vit` builds the timm model (``dynamic_img_size=True`` so one model takes global
  and local crops; class tokens re-initialised trunc-normal std 0.02 as DINO/UDI do, instead of
  timm's 1e-6, which would start ``cls`` and ``cls+`` almost identical);
* :func:`last_tokens` — the token matrix after the last block, *before* the final norm;
* :func:`last_attention` — the last block's attention probabilities, computed explicitly
  (timm's fused attention never materialises them);
* :func:`intermediate_class_tokens` — the normed class tokens of the last blocks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from narrows.errors import UserError

#: attribute set on every ViT built by :func:`create_vit`: how to build it again
CREATE_SPEC = "narrows_create"


def create_vit(name: str, *, num_class_tokens: int = 2, img_size: int = 224,
               drop_path_rate: float = 0.0, **timm_kwargs: Any) -> nn.Module:
    """The timm ``VisionTransformer`` ``name`` with ``num_class_tokens`` (1 or 2) prepended class tokens.

    Random weights, no classifier (``num_classes=0``), position embedding sized for ``img_size``
    but any input size that the patch size divides is accepted; stochastic depth rises linearly
    to ``drop_path_rate``. ``timm_kwargs`` go to ``timm.create_model`` (e.g. ``depth=2, embed_dim=48``). The build
    arguments are recorded on the model under :data:`CREATE_SPEC`.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if num_class_tokens not in (1, 2):
        raise UserError(f"num_class_tokens={num_class_tokens} is not supported",
                        "use 2 (UDI: cls and cls+) or 1 (DINO)")
    for key in ("reg_tokens", "class_token", "num_classes", "dynamic_img_size", "pretrained"):
        if key in timm_kwargs:
            raise UserError(f"the ViT option {key} is set by narrows itself",
                            f"remove {key} from the model arguments")
    if "_reg" in name:
        raise UserError(f"{name} has register tokens of its own",
                        "pick a ViT without registers, e.g. vit_small_patch16_224")
    if not timm.is_model(name.split(".")[0]):
        raise UserError(f"unknown timm model {name!r}",
                        "pick a timm VisionTransformer name, e.g. vit_small_patch16_224")
    kwargs = dict(timm_kwargs, img_size=img_size, drop_path_rate=drop_path_rate)
    try:
        vit = timm.create_model(name, pretrained=False, num_classes=0,
                                reg_tokens=num_class_tokens - 1, dynamic_img_size=True, **kwargs)
    except TypeError as exc:
        raise UserError(f"{name} cannot be built as a plain ViT with class tokens ({exc})",
                        "pick a timm VisionTransformer, e.g. vit_small_patch16_224") from exc
    if type(vit) is not VisionTransformer:
        raise UserError(f"{name} is a {type(vit).__name__}, not a timm VisionTransformer",
                        "pick a plain ViT, e.g. vit_small_patch16_224 or vit_tiny_patch16_224")
    if vit.cls_token is None or vit.pos_embed is None or vit.no_embed_class:
        raise UserError(f"{name} has no class token with its own positional row",
                        "pick a ViT with class_token=True and no_embed_class=False "
                        "(e.g. vit_small_patch16_224)")
    if vit.global_pool != "token" or isinstance(vit.norm, nn.Identity):
        raise UserError(f"{name} pools its tokens with '{vit.global_pool}' and has no final "
                        "norm on the class token", "add global_pool=token to the model arguments "
                        "or pick a class-token ViT")
    with torch.no_grad():
        for token in (vit.cls_token, vit.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
    setattr(vit, CREATE_SPEC, {"name": name, "num_class_tokens": num_class_tokens,
                               "kwargs": kwargs})
    return vit


def class_token_count(vit: nn.Module) -> int:
    """The class tokens prepended by ``vit`` (``cls`` plus ``cls+`` when 2)."""
    return int(vit.num_prefix_tokens)


def _embed(vit: nn.Module, x: Tensor) -> Tensor:
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def last_tokens(vit: nn.Module, x: Tensor) -> Tensor:
    """Tokens of ``vit`` after its last block, before the final norm: [B, n_c + N, D] for
    images ``x`` [B, 3, H, W] of any size the patch size divides."""
    x = _embed(vit, x)
    if getattr(vit, "grad_checkpointing", False) and not torch.jit.is_scripting():
        from timm.models._manipulate import checkpoint_seq

        return checkpoint_seq(vit.blocks, x)
    return vit.blocks(x)


def intermediate_class_tokens(vit: nn.Module, x: Tensor, n_last: int) -> Tensor:
    """The final-normed class tokens of the last ``n_last`` blocks of ``vit`` for images ``x``:
    [n_last, B, n_c, D] (oldest block first)."""
    depth = len(vit.blocks)
    if not 1 <= n_last <= depth:
        raise UserError(f"asked for the last {n_last} blocks of a ViT with {depth}",
                        f"give a number between 1 and {depth}")
    n_c = class_token_count(vit)
    x = _embed(vit, x)
    kept = []
    for index, block in enumerate(vit.blocks):
        x = block(x)
        if index >= depth - n_last:
            kept.append(vit.norm(x[:, :n_c]))
    return torch.stack(kept)


def attention_probabilities(attn: nn.Module, x: Tensor) -> Tensor:
    """Softmax attention [B, h, T, T] of the timm ``Attention`` module ``attn`` on its input
    ``x`` [B, T, D] (already through the block's norm1); q_norm/k_norm are honoured."""
    if not all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "scale")):
        raise UserError(f"the attention module {type(attn).__name__} has no single qkv projection",
                        "use a plain timm ViT for attention maps")
    b, t, _ = x.shape
    qkv = attn.qkv(x).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def last_attention(vit: nn.Module, x: Tensor) -> Tensor:
    """The last block's attention probabilities [B, heads, T, T] of ``vit`` for images ``x``,
    T = n_c + N (rows sum to 1; computed explicitly, also when timm fuses attention)."""
    h = _embed(vit, x)
    for block in vit.blocks[:-1]:
        h = block(h)
    last = vit.blocks[-1]
    return attention_probabilities(last.attn, last.norm1(h))
