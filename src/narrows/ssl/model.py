"""The UDI networks (spec §1, §4): ViT backbone, LN_1, SRS attention and one shared DINO head.

:class:`UDIModel` serves both roles. ``forward_student`` runs the backbone once on the 2B global
crops and once on the nB local crops; ``forward_teacher`` runs it once on the globals only and
applies SRS per map group (upstream ran the teacher backbone twice on the same images: §10.6).
Everything is indexed by view and crop as in the contract; nothing is reversed or interleaved.

Fixes of upstream (spec §10): LN_1 and the SRS attention take the backbone's width, and the SRS
heads default to the backbone's (``srs_heads=6`` gives upstream's hard-coded value, §10.1); the
student does no SRS on local crops unless ``local_patch`` (§10.6); with ``patch_level=False``
(DINO) there are no SRS/LN_1 modules at all.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError
from narrows.models.vit_tokens import class_token_count, create_vit, last_tokens
from narrows.ssl.loss import Patches, StudentOutput, TeacherOutput


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g · v / ‖v‖`` per output row (``weight_g`` [K, 1], ``weight_v`` [K, d]).

    The parameter names are those of ``torch.nn.utils.weight_norm``, i.e. of DINO/UDI checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        plain = nn.Linear(in_dim, out_dim, bias=False)  # DINO keeps nn.Linear's default init for v
        self.weight_v = nn.Parameter(plain.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self) -> Tensor:
        """The effective weight [K, d]."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO's projection head: MLP (GELU) → L2-normalise → weight-normalised linear to K logits."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        if layers < 1:
            raise UserError(f"a head with {layers} layers", "give at least 1 layer")
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck)
        else:
            parts: list[nn.Module] = []
            width = in_dim
            for _ in range(layers - 1):
                parts.append(nn.Linear(width, hidden))
                if use_bn:
                    parts.append(nn.BatchNorm1d(hidden))
                parts.append(nn.GELU())
                width = hidden
            parts.append(nn.Linear(width, bottleneck))
            self.mlp = nn.Sequential(*parts)
        self.mlp.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [..., K] for features [..., in_dim] (any leading dims)."""
        lead = x.shape[:-1]
        if x.numel() == 0:
            return x.new_zeros(*lead, self.last_layer.weight_v.shape[0])
        h = self.mlp(x.reshape(-1, x.shape[-1]))
        h = F.normalize(h, dim=-1, p=2)
        out = self.last_layer(h)
        return out.reshape(*lead, out.shape[-1])


class SRSAttention(nn.Module):
    """One cross-attention layer from sampled (or interpolated) patch tokens to all patch tokens.

    ``ẑ = LN(M·Z + W_o · MHA(q = M·Q, K, V from Z))`` per map row (spec §1.2); keys and values are
    every patch token of the same view, class tokens excluded.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise UserError(f"SRS heads {heads} do not divide the width {dim}",
                            "pick srs_heads dividing the ViT's embedding width")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(_init_linear)

    def forward(self, tokens: Tensor, maps: Tensor) -> Tensor:
        """Patch representations [..., B, S, D] for tokens [..., B, N, D] and maps [..., B, S, N].

        Leading dims broadcast as in torch (right-aligned): view-major tokens [2, B, N, D]
        against maps [2, n, B, S, N] must be given as ``tokens[:, None]``. An all-zero map row
        gets a zero query, hence a uniform (finite, harmless) attention row; mask it later.
        """
        *lead, n_tok, dim = tokens.shape
        maps = maps.to(tokens.dtype)
        qkv = self.qkv(tokens).reshape(*lead, n_tok, 3, self.heads, self.head_dim)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each [..., B, h, N, dh]
        q_s = maps.unsqueeze(-3) @ q  # [..., B, h, S, dh]
        attn = ((q_s * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(-3, -2)  # [..., B, S, h, dh]
        out = self.proj(out.reshape(*out.shape[:-2], dim))
        return self.norm(out + maps @ tokens)


def _valid(maps: Tensor) -> Tensor:
    return maps.abs().sum(dim=-1) > 0


class UDIModel(nn.Module):
    """Backbone (from :func:`~narrows.models.vit_tokens.create_vit`) + LN_1 + SRS + one shared head.

    ``patch_level=False`` with one class token is DINO: no ``norm1``/``srs`` modules (``None``).
    """

    def __init__(self, backbone: nn.Module, *, out_dim: int, num_class_tokens: int | None = None,
                 patch_level: bool = True, local_patch: bool = False, head_hidden: int = 2048,
                 head_bottleneck: int = 256, head_layers: int = 3, norm_last_layer: bool = True,
                 use_bn_in_head: bool = False, srs_heads: int | None = None) -> None:
        super().__init__()
        n_c = class_token_count(backbone)
        if num_class_tokens is not None and num_class_tokens != n_c:
            raise UserError(f"the backbone has {n_c} class tokens, not {num_class_tokens}",
                            "build it with create_vit(num_class_tokens=...)")
        if n_c == 2 and not patch_level:
            raise UserError("two class tokens need the patch level (cls+ learns from patches)",
                            "use patch_level=True, or one class token for DINO")
        if local_patch and not patch_level:
            raise UserError("local_patch needs the patch level", "use patch_level=True")
        self.backbone = backbone
        self.num_class_tokens = n_c
        self.patch_level = patch_level
        self.local_patch = local_patch
        dim = int(backbone.embed_dim)
        if patch_level:
            heads = srs_heads if srs_heads is not None else int(backbone.blocks[-1].attn.num_heads)
            self.norm1: nn.LayerNorm | None = nn.LayerNorm(dim, eps=1e-6)
            self.srs: SRSAttention | None = SRSAttention(dim, heads)
        else:
            self.norm1 = None
            self.srs = None
        self.head = DINOHead(dim, out_dim, head_hidden, head_bottleneck, head_layers,
                             norm_last_layer, use_bn_in_head)
        self.head_uses_bn = use_bn_in_head

    # -- pieces -------------------------------------------------------------------------------
    def _run(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """images [V, B, 3, H, W] → (class outputs [V, B, n_c, D] after the final norm,
        LN_1 patch tokens [V, B, N, D] or None)."""
        views, batch = images.shape[:2]
        tokens = last_tokens(self.backbone, images.flatten(0, 1))
        tokens = tokens.unflatten(0, (views, batch))
        n_c = self.num_class_tokens
        classes = self.backbone.norm(tokens[:, :, :n_c])
        patches = self.norm1(tokens[:, :, n_c:]) if self.norm1 is not None else None
        return classes, patches

    def _patch_logits(self, tokens: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.srs(tokens, maps)), _valid(maps)

    # -- the two roles ------------------------------------------------------------------------
    def _heads(self, *inputs: Tensor | tuple[Tensor, Tensor]) -> list[Tensor]:
        """``head`` of each input [..., D] → [..., K], in one call on all of them together
        (fewer, larger matrix products; one call each when the head has BatchNorm, whose batch
        statistics stay per input as upstream). An input given as ``(x, valid)`` is run on its
        valid rows only (``valid`` [...] bool: the sampled points inside the other view); its
        other rows are 0 — upstream ran the head on the padding rows too (about a quarter of the
        patch rows at the default crop scales) and masked the results away."""
        rows, shapes, masks = [], [], []
        for item in inputs:
            x, valid = item if isinstance(item, tuple) else (item, None)
            rows.append(x.reshape(-1, x.shape[-1]) if valid is None else x[valid])
            shapes.append(x.shape[:-1])
            masks.append(valid)
        if self.head_uses_bn:
            flat_out = [self.head(r) for r in rows]
        else:
            flat = self.head(torch.cat(rows))
            flat_out = list(flat.split([r.shape[0] for r in rows]))
        outputs = []
        for piece, shape, valid in zip(flat_out, shapes, masks, strict=True):
            if valid is None:
                outputs.append(piece.reshape(*shape, piece.shape[-1]))
            else:
                full = piece.new_zeros(*shape, piece.shape[-1])
                full[valid] = piece
                outputs.append(full)
        return outputs

    def forward_student(self, batch: dict[str, Tensor]) -> StudentOutput:
        """Student logits of all 2 + n crops (contract layout)."""
        classes, patches = self._run(batch["globals"])
        local_images = batch.get("locals")
        n_local = 0 if local_images is None else local_images.shape[0]
        inputs: list[Tensor | tuple[Tensor, Tensor]] = [classes]
        if patches is not None:
            inputs.append((self.srs(patches, batch["src_global"]), _valid(batch["src_global"])))
        l_patches = None
        if n_local:
            l_classes, l_patches = self._run(local_images)
            inputs.append(l_classes)
            if self.local_patch:
                src_local = batch["src_local"]
                inputs.append((self.srs(l_patches, src_local), _valid(src_local)))
        outputs = self._heads(*inputs)
        logits = outputs.pop(0)  # [2, B, n_c, K]
        out = StudentOutput(cls_global=logits[:, :, 0], cls_local=logits.new_zeros(0))
        if self.num_class_tokens == 2:
            out.plus_global = logits[:, :, 1]
        if patches is not None:
            out.patch_global = Patches(outputs.pop(0), _valid(batch["src_global"]))
        if n_local:
            l_logits = outputs.pop(0)
            out.cls_local = l_logits[:, :, 0]
            if self.num_class_tokens == 2:
                out.plus_local = l_logits[:, :, 1]
            if self.local_patch:
                out.patch_local = Patches(outputs.pop(0), _valid(batch["src_local"]))
        else:
            shape = (0, logits.shape[1], logits.shape[-1])
            out.cls_local = logits.new_zeros(shape)
            if self.num_class_tokens == 2:
                out.plus_local = logits.new_zeros(shape)
        return out

    def forward_teacher(self, batch: dict[str, Tensor]) -> TeacherOutput:
        """Teacher logits of the two global crops; one backbone pass, SRS per map group."""
        classes, patches = self._run(batch["globals"])
        if patches is None:
            return TeacherOutput(cls=self.head(classes[:, :, 0]))
        # index u of tgt_global holds points on the grid of view 1 − u
        tgt_global = batch["tgt_global"]
        inputs = [classes[:, :, 0], (self.srs(patches.flip(0), tgt_global), _valid(tgt_global))]
        tgt_local = batch.get("tgt_local")
        if tgt_local is not None:
            # index v of tgt_local holds points on the grid of view v
            inputs.append((self.srs(patches[:, None], tgt_local), _valid(tgt_local)))
        outputs = self._heads(*inputs)
        out = TeacherOutput(cls=outputs[0], patch_global=Patches(outputs[1], _valid(tgt_global)))
        if tgt_local is not None:
            out.patch_local = Patches(outputs[2], _valid(tgt_local))
        return out

    def forward(self, batch: dict[str, Tensor]) -> StudentOutput:
        """:meth:`forward_student` (so that DDP can wrap the student)."""
        return self.forward_student(batch)

    # -- features for evaluation ----------------------------------------------------------------
    def backbone_features(self, x: Tensor) -> dict[str, Tensor | None]:
        """Final-normed ``cls`` [B, D], ``plus`` [B, D] (None with one class token) and
        ``patches`` [B, N, D] (final norm, as a timm export gives them) for images [B, 3, H, W]."""
        normed = self.backbone.norm(last_tokens(self.backbone, x))
        n_c = self.num_class_tokens
        return {"cls": normed[:, 0], "plus": normed[:, 1] if n_c == 2 else None,
                "patches": normed[:, n_c:]}

    def features(self, x: Tensor, which: str = "cls") -> Tensor:
        """One feature vector [B, D] or [B, 2D] per image: ``cls``, ``plus``, ``avgpool`` (mean
        patch token), ``cls+plus`` or ``cls+avgpool`` (concatenations)."""
        found = self.backbone_features(x)
        parts = {"cls": found["cls"], "plus": found["plus"],
                 "avgpool": found["patches"].mean(dim=1)}
        names = which.split("+")
        if any(name not in parts for name in names):
            raise UserError(f"unknown feature {which!r}",
                            "use cls, plus, avgpool, cls+plus or cls+avgpool")
        if any(parts[name] is None for name in names):
            raise UserError(f"feature {which!r} needs two class tokens", "use cls or avgpool")
        return torch.cat([parts[name] for name in names], dim=-1)


def build_pair(name: str, *, num_class_tokens: int = 2, img_size: int = 224,
               drop_path_rate: float = 0.1, patch_level: bool = True, local_patch: bool = False,
               out_dim: int = 65536, head_hidden: int = 2048, head_bottleneck: int = 256,
               head_layers: int = 3, norm_last_layer: bool = True, use_bn_in_head: bool = False,
               srs_heads: int | None = None, **timm_kwargs: Any) -> tuple[UDIModel, UDIModel]:
    """A student (with drop-path) and a teacher (drop-path 0, a copy of the student's weights,
    no gradients).

    ``name``, ``num_class_tokens``, ``img_size``, ``drop_path_rate`` (student only) and
    ``timm_kwargs`` build the ViTs (:func:`~narrows.models.vit_tokens.create_vit`);
    ``patch_level``, ``local_patch``, ``out_dim``, ``head_hidden``, ``head_bottleneck``,
    ``head_layers``, ``norm_last_layer`` (student only), ``use_bn_in_head`` and ``srs_heads``
    (None: the backbone's heads) are :class:`UDIModel`'s.
    """
    def build(rate: float, norm_last: bool) -> UDIModel:
        vit = create_vit(name, num_class_tokens=num_class_tokens, img_size=img_size,
                         drop_path_rate=rate, **timm_kwargs)
        return UDIModel(vit, out_dim=out_dim, num_class_tokens=num_class_tokens,
                        patch_level=patch_level, local_patch=local_patch, head_hidden=head_hidden,
                        head_bottleneck=head_bottleneck, head_layers=head_layers,
                        norm_last_layer=norm_last, use_bn_in_head=use_bn_in_head,
                        srs_heads=srs_heads)

    student = build(drop_path_rate, norm_last_layer)
    teacher = build(0.0, True)
    teacher.load_state_dict(copy.deepcopy(student.state_dict()), strict=True)
    teacher.requires_grad_(False)
    return student, teacher


def pair_for(options: Any) -> tuple[UDIModel, UDIModel]:
    """:func:`build_pair` for ``options`` (an :class:`~narrows.ssl.options.SSLOptions`, or the
    options dict a checkpoint stores): the networks a run with those options trains."""
    from narrows.ssl.options import SSLOptions
    from narrows.training.model_kwargs import parse_model_kwargs

    if isinstance(options, dict):
        options = SSLOptions(**options)
    return build_pair(
        options.model, num_class_tokens=options.num_class_tokens, img_size=options.img_size,
        drop_path_rate=options.drop_path_rate, patch_level=options.patch_level,
        local_patch=options.local_patch, out_dim=options.out_dim, head_hidden=options.head_hidden,
        head_bottleneck=options.head_bottleneck, head_layers=options.head_layers,
        norm_last_layer=options.norm_last_layer, use_bn_in_head=options.use_bn_in_head,
        srs_heads=options.srs_heads, **parse_model_kwargs(options.model_kwargs))
