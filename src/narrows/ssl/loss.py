"""The UDI objective (spec §5): three cross-entropy levels and their centres.

Levels: ``cls`` (DINO's cls-to-cls), ``plus`` (cls+ against a blend of the teacher's cls and
patch predictions) and ``patch`` (each sampled student patch against the teacher's prediction at
the same image point in the other global view). ``num_class_tokens=1, patch_level=False`` is
DINO's loss exactly.

Fixes of upstream bugs and choices made here (spec §10):

* §10.3 — ``num_class_tokens=2`` without the patch level used to crash with an IndexError; it is
  refused up front with a :class:`~narrows.errors.UserError`. The number of centres follows the
  levels actually present (3, 2 or 1).
* §10.4 — the centre all-reduce is a no-op unless ``torch.distributed`` is initialised, so the
  loss runs on one CPU process.
* §10.7 — the cls+ target blends logits as upstream (``plus_target="logit_mean"``, default);
  ``"prob_mixture"`` mixes the tempered probabilities instead (an ablation, not a reproduction).
* §10.8 — the patch loss divides by the number of valid student samples clamped to ≥ 1, so a
  batch without any valid sample gives 0, not NaN; invalid student logits are replaced by 0
  (not 1e-9-filled garbage) before the log-softmax, and invalid teacher logits never enter a
  softmax or a mean, so NaN/inf in padding slots cannot leak into the loss.
* §10.10 — a centre statistic is one global mean over all ranks (sums and counts all-reduced),
  not upstream's mean of per-rank means, and the patch loss is normalised by the global count of
  valid samples: a run on N processes computes the loss of the same global batch as one process
  (the two differ upstream when ranks hold different numbers of valid patches). Local blended
  and patch logits still feed c_1/c_2, as upstream.
* Softmaxes and cross-entropies run in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from narrows.errors import UserError

PlusTarget = Literal["logit_mean", "prob_mixture"]
_BLEND_EPS = 1e-5  # upstream's guard in the masked mean of the cls+ logit blend


@dataclass
class Patches:
    """Patch-level logits ``logits`` [..., S, K] and ``mask`` [..., S] (bool): which of the S
    slots hold a valid sample (the others are padding, never read)."""

    logits: Tensor
    mask: Tensor


@dataclass
class StudentOutput:
    """Student logits (spec §4, contract layout); ``None`` where a level is off.

    ``cls_global`` [2, B, K], ``cls_local`` [n, B, K], ``plus_global`` [2, B, K] and
    ``plus_local`` [n, B, K] (cls+ token), ``patch_global`` [2, B, Sg] (index u: head(SRS) of
    view u at its valid samples); with ``local_patch=True`` also ``patch_local`` [2, n, B, Sl]
    (index v: samples of local crop k valid in global view v); shapes of patches are those of
    their masks.
    """

    cls_global: Tensor
    cls_local: Tensor
    plus_global: Tensor | None = None
    plus_local: Tensor | None = None
    patch_global: Patches | None = None
    patch_local: Patches | None = None


@dataclass
class TeacherOutput:
    """Raw teacher logits (spec §4, contract layout); ``None`` where a level is off.

    ``cls`` [2, B, K] (view v); ``patch_global`` [2, B, Sg] (index u: view 1−u at the points of
    u's samples), ``patch_local`` [2, n, B, Sl] (index v: view v at the points of local crop k's
    samples); shapes of patches are those of their masks.
    """

    cls: Tensor
    patch_global: Patches | None = None
    patch_local: Patches | None = None


@dataclass
class LossOutput:
    """``total`` (scalar with gradient) and detached scalar ``terms`` for logging."""

    total: Tensor
    terms: dict[str, Tensor]


def wide_dtype(x: Tensor) -> torch.dtype:
    """float32, or ``x``'s dtype when that is wider (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def wide(x: Tensor) -> Tensor:
    """``x`` in :func:`wide_dtype` (a no-op for float32/float64 tensors)."""
    return x.to(wide_dtype(x))


def cross_entropy(target: Tensor, logits: Tensor, student_temp: float) -> Tensor:
    """−Σ_y target_y · log softmax(logits/τ_s)_y over the last axis, in float32 or wider."""
    return -(target * F.log_softmax(wide(logits) / student_temp, dim=-1)).sum(-1)


def masked_mean(zeroed: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Σ_i zeroed[..., i, :] / (count of ``mask`` [..., S] + eps), summed in float32 or wider.

    ``zeroed`` [..., S, K] must already hold zeros in the invalid rows.
    """
    dtype = wide_dtype(zeroed)
    return zeroed.sum(-2, dtype=dtype) / (mask.sum(-1, keepdim=True).to(dtype) + eps)


def zero_invalid(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` [..., S, K] with the rows where ``mask`` [..., S] is False set to 0 (NaN-safe)."""
    return torch.where(mask.unsqueeze(-1), values,
                       torch.zeros((), dtype=values.dtype, device=values.device))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_count(mask: Tensor) -> Tensor:
    """The number of valid samples per process: this rank's count, or under torch.distributed
    the count over all ranks divided by the world size — so that DDP's average of the ranks'
    gradients is the gradient of one masked mean over the whole batch."""
    count = mask.sum().to(torch.float32)
    if _distributed():
        count = count.clone()
        dist.all_reduce(count)
        count /= dist.get_world_size()
    return count


class UDILoss(nn.Module):
    """UDI's loss with centres ``center`` [levels, K] (rows: cls, plus, patch — those present).

    ``local_patch=True`` adds a local patch term ``l_pch`` (each valid student sample of local
    crop k against teacher view v at the same point, masked mean over all of them) and the patch
    level becomes ``(2·g_pch + 2n·l_pch)/(2 + 2n)``, the same pair weighting as the other levels.
    Terms of local crops (``l_*``) are omitted when the batch has no local crops. With
    ``plus_target="prob_mixture"`` the experts use c_0 and c_2; c_1 is still tracked (same
    checkpoint layout) but not used.
    """

    def __init__(self, out_dim: int, *, num_class_tokens: int = 2, patch_level: bool = True,
                 local_patch: bool = False, alpha: float = 0.5,
                 plus_target: PlusTarget = "logit_mean", student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if num_class_tokens not in (1, 2):
            raise UserError(f"num_class_tokens must be 1 or 2, not {num_class_tokens}",
                            "use 2 for UDI (cls, cls+) or 1 for DINO")
        if num_class_tokens == 2 and not patch_level:
            raise UserError("two class tokens need the patch level (the cls+ target is built "
                            "from the teacher's patch predictions)",
                            "turn the patch level on, or use one class token (DINO)")
        if local_patch and not patch_level:
            raise UserError("local_patch needs the patch level", "turn the patch level on")
        if plus_target not in ("logit_mean", "prob_mixture"):
            raise UserError(f"unknown plus_target {plus_target!r}",
                            "use 'logit_mean' or 'prob_mixture'")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"alpha must lie in [0, 1], not {alpha}", "pick a value in [0, 1]")
        self.out_dim = out_dim
        self.num_class_tokens = num_class_tokens
        self.patch_level = patch_level
        self.local_patch = local_patch
        self.alpha = alpha
        self.plus_target = plus_target
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.levels: tuple[str, ...] = ("cls",) + (("plus",) if num_class_tokens == 2 else ()) \
            + (("patch",) if patch_level else ())
        self.register_buffer("center", torch.zeros(len(self.levels), out_dim))

    def level_index(self, level: str) -> int:
        """Row of ``center`` that holds ``level`` ("cls", "plus" or "patch")."""
        return self.levels.index(level)

    def _center(self, level: str) -> Tensor:
        return wide(self.center[self.level_index(level)])

    def _target(self, logits: Tensor, level: str, teacher_temp: float) -> Tensor:
        return F.softmax((logits - self._center(level)) / teacher_temp, dim=-1)

    def forward(self, student: StudentOutput, teacher: TeacherOutput,
                teacher_temp: float | Tensor) -> LossOutput:
        """The loss of one batch; then moves the centres (the loss used the old ones)."""
        tau_t = float(teacher_temp)
        tau_s = self.student_temp
        n = student.cls_local.shape[0]
        t_cls = wide(teacher.cls.detach())  # [2, B, K]
        terms: dict[str, Tensor | None] = {}
        levels: list[Tensor] = []

        def pair_weighted(g: Tensor, loc: Tensor | None) -> Tensor:
            return g if loc is None else (2 * g + 2 * n * loc) / (2 + 2 * n)

        # cls level: student view u against teacher view 1 − u; local crop k against both views
        p_cls = self._target(t_cls, "cls", tau_t)
        g_cl = cross_entropy(p_cls.flip(0), student.cls_global, tau_s).mean()
        l_cl = self._local_ce(p_cls, student.cls_local) if n else None
        levels.append(pair_weighted(g_cl, l_cl))
        terms["g_cl"], terms["l_cl"] = g_cl, l_cl

        blend_g = blend_l = None
        patch_g = patch_l = mask_g = mask_l = None
        if self.patch_level:
            patch_g, mask_g = self._teacher_patches(teacher.patch_global, "patch_global")
            if n:
                patch_l, mask_l = self._teacher_patches(teacher.patch_local, "patch_local")

        if self.num_class_tokens == 2:
            # ℓ⁺(u→1−u): teacher.patch_global[u] is view 1−u at u's points
            blend_g = self._blend(patch_g, mask_g, t_cls.flip(0))
            p_plus_g = self._plus_target(blend_g, patch_g, mask_g, t_cls.flip(0), tau_t)
            g_mcl = cross_entropy(p_plus_g, _need(student.plus_global, "plus_global"),
                                  tau_s).mean()
            l_mcl = None
            if n:
                t_cls_l = t_cls.unsqueeze(1).expand(-1, n, -1, -1)  # [2, n, B, K]
                blend_l = self._blend(patch_l, mask_l, t_cls_l)
                p_plus_l = self._plus_target(blend_l, patch_l, mask_l, t_cls_l, tau_t)
                s_plus_l = _need(student.plus_local, "plus_local").unsqueeze(0)
                l_mcl = cross_entropy(p_plus_l, s_plus_l, tau_s).mean()
            levels.append(pair_weighted(g_mcl, l_mcl))
            terms["g_mcl"], terms["l_mcl"] = g_mcl, l_mcl

        if self.patch_level:
            g_pch = self._patch_ce(_need(student.patch_global, "patch_global"), patch_g, mask_g,
                                   tau_t)
            l_pch = None
            if self.local_patch and n:
                l_pch = self._patch_ce(_need(student.patch_local, "patch_local"), patch_l,
                                       mask_l, tau_t)
            levels.append(pair_weighted(g_pch, l_pch))
            terms["g_pch"], terms["l_pch"] = g_pch, l_pch

        total = torch.stack(levels).mean()
        with torch.no_grad():
            log_p = F.log_softmax((t_cls - self._center("cls")) / tau_t, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1).mean()
        out = {k: v.detach() for k, v in terms.items() if v is not None}
        out["entropy_cls"] = entropy.detach()
        self.update_center(t_cls, blend_g, blend_l, patch_g, mask_g, patch_l, mask_l)
        return LossOutput(total=total, terms=out)

    # ---- pieces -------------------------------------------------------------------------------

    def _local_ce(self, p_views: Tensor, s_local: Tensor) -> Tensor:
        """Mean over (v, k, b) of H(p_views[v], s_local[k]); p_views [2, B, K], s_local [n, B, K]."""
        log_q = F.log_softmax(wide(s_local) / self.student_temp, dim=-1)
        return -torch.einsum("vbk,nbk->vnb", p_views, log_q).mean()

    @staticmethod
    def _teacher_patches(patches: Patches | None, name: str) -> tuple[Tensor, Tensor]:
        """Detached teacher patch logits (own dtype) with invalid slots zeroed, and the mask.

        They stay in their own dtype (the local ones can be large); sums widen on the fly.
        """
        patches = _need(patches, f"teacher {name}")
        mask = patches.mask.bool()
        return zero_invalid(patches.logits.detach(), mask), mask

    def _blend(self, patches: Tensor, mask: Tensor, cls: Tensor) -> Tensor:
        """ℓ⁺ = α·(masked mean of the valid patch logits, +1e-5 guard) + (1 − α)·cls logits."""
        return self.alpha * masked_mean(patches, mask, _BLEND_EPS) + (1 - self.alpha) * cls

    def _plus_target(self, blend: Tensor, patches: Tensor, mask: Tensor, cls: Tensor,
                     tau_t: float) -> Tensor:
        """P⁺: softmax((ℓ⁺ − c_1)/τ_t), or α·mean_i P_p + (1 − α)·P_cls for ``prob_mixture``.

        The mixture's experts carry their own centres (c_2 for patches, c_0 for cls); a crop
        without valid samples gets P_cls (the patch share drops to 0 so P⁺ still sums to 1).
        """
        if self.plus_target == "logit_mean":
            return self._target(blend, "plus", tau_t)
        p_patch = self._target(wide(patches), "patch", tau_t)  # [..., S, K]
        count = mask.sum(-1, keepdim=True).to(p_patch.dtype)
        mean_patch = zero_invalid(p_patch, mask).sum(-2) / count.clamp_min(1)
        share = self.alpha * (count > 0).to(p_patch.dtype)
        return share * mean_patch + (1 - share) * self._target(cls, "cls", tau_t)

    def _patch_ce(self, student: Patches, t_patch: Tensor, t_mask: Tensor,
                  tau_t: float) -> Tensor:
        """Σ m_s·H(P_p, s) / max(Σ m_s, 1) over the valid student samples."""
        s_mask = student.mask.bool()
        safe = zero_invalid(student.logits, s_mask)
        h = cross_entropy(self._target(wide(t_patch), "patch", tau_t), safe, self.student_temp)
        h = torch.where(s_mask, h, torch.zeros((), device=h.device))
        return h.sum() / global_count(s_mask).clamp_min(1)

    @torch.no_grad()
    def update_center(self, t_cls: Tensor, blend_g: Tensor | None, blend_l: Tensor | None,
                      patch_g: Tensor | None, mask_g: Tensor | None, patch_l: Tensor | None,
                      mask_l: Tensor | None) -> None:
        """c ← m·c + (1 − m)·batch mean of the raw teacher logits of each level (spec §5.5).

        c_0: the 2B teacher cls logits; c_1: every ℓ⁺ (global and local); c_2: every valid
        teacher patch logit (global and local); a batch without valid patches leaves c_2 as it
        is. Under torch.distributed the sums and counts of all ranks make one global mean.
        """
        k = self.out_dim
        sums, counts = [], []

        def add(total: Tensor, count: Tensor | float) -> None:
            sums.append(total)
            counts.append(torch.as_tensor(count, dtype=total.dtype, device=total.device))

        add(t_cls.reshape(-1, k).sum(0), t_cls[..., 0].numel())
        if "plus" in self.levels:
            blends = torch.cat([b.reshape(-1, k) for b in (blend_g, blend_l) if b is not None])
            add(blends.sum(0, dtype=t_cls.dtype), blends.shape[0])
        if "patch" in self.levels:
            total = torch.zeros(k, device=t_cls.device, dtype=t_cls.dtype)
            count = torch.zeros((), device=t_cls.device, dtype=t_cls.dtype)
            for p, m in ((patch_g, mask_g), (patch_l, mask_l)):
                if p is not None and m is not None:
                    total += p.reshape(-1, k).sum(0, dtype=total.dtype)  # invalid rows are zero
                    count += m.sum()
            add(total, count)
        totals, numbers = torch.stack(sums), torch.stack(counts)
        if _distributed():  # one global mean: the batch is the batch, however it is sharded
            dist.all_reduce(totals)
            dist.all_reduce(numbers)
        current = self.center.to(totals.dtype)
        batch = torch.where(numbers[:, None] > 0, totals / numbers.clamp_min(1)[:, None], current)
        m = self.center_momentum
        self.center.mul_(m).add_(batch.to(self.center.dtype), alpha=1 - m)


def _need(value: Tensor | None, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"the loss needs {name}, but the model output has None there")
    return value
