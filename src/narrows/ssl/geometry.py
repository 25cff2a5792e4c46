"""Crop geometry, SRS masks and sampling maps of UDI's views (spec §2.1, §3).

Everything here is pure torch and every random draw comes from a passed ``torch.Generator``, so
a (seed, epoch, index) triple fixes a sample whatever the process or worker count.

Coordinates: a crop of pixel rows ``top … top+height−1`` and columns ``left … left+width−1`` of an
``H×W`` image is recorded as the normalised, flip-encoded ``[i0, j0, i1, j1]`` =
``[top/(H−1), left/(W−1), (top+height−1)/(H−1), (left+width−1)/(W−1)]``; a horizontal flip swaps
``j0`` and ``j1`` (spec §2.1).

Upstream behaviours that ``compat_upstream=True`` reproduces (the default fixes each; spec §10.5):

1. *Horizontal extent with the row start*: the shift rule computes the horizontal bounding box as
   ``max(J, rJ) − min(i, rj)`` (``i`` where ``j`` is meant). Fixed: ``min(j, rj)``; the fixed rule
   also measures extents in pixels (not ``last − first``) and rounds the shift up, so the per-axis
   overlap is at least half the smaller extent before clamping.
2. *Flip-corrupted local reference box*: upstream's "intersection" helper takes the element-wise
   min/max of the flip-encoded coordinates, which mixes edges when one global view is mirrored.
   Fixed: the true union of the unflipped boxes of A and B.
3. *Token centres edge to edge*: upstream models the F×F token centres as a lattice from the
   crop's first pixel to its last. Fixed: token centres at patch centres, half a patch inside the
   crop's pixel edges; validity is tested against the crop's pixel extent, and target indices in
   the half patch between an edge and the outermost centre are clamped to the border token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from narrows.errors import UserError

RATIO = (3.0 / 4.0, 4.0 / 3.0)
PAIRINGS = ("shifted_overlap", "nested")


@dataclass(frozen=True)
class Crop:
    """A crop in pixels of an ``image_h × image_w`` image; ``flipped`` = mirrored horizontally."""

    top: int
    left: int
    height: int
    width: int
    image_h: int
    image_w: int
    flipped: bool = False

    @property
    def bottom(self) -> int:
        """Last pixel row (inclusive)."""
        return self.top + self.height - 1

    @property
    def right(self) -> int:
        """Last pixel column (inclusive)."""
        return self.left + self.width - 1

    def coords(self) -> torch.Tensor:
        """Normalised flip-encoded ``[i0, j0, i1, j1]`` (float32, spec §2.1)."""
        hn, wn = max(self.image_h - 1, 1), max(self.image_w - 1, 1)
        j0, j1 = self.left / wn, self.right / wn
        if self.flipped:
            j0, j1 = j1, j0
        return torch.tensor([self.top / hn, j0, self.bottom / hn, j1], dtype=torch.float32)

    def frame(self, compat_upstream: bool = False) -> tuple[float, float, float, float]:
        """``(s_i, s_j, e_i, e_j)`` in pixel-index units: token ``(a, b)`` of an F×F grid sits at
        ``s + u·(e − s)`` with ``u = a/(F−1)`` (compat: first to last pixel centre) or
        ``u = (a + ½)/F`` (fixed: pixel edges, so patch centres). Flip-encoded (mirrored: e_j < s_j).
        """
        if compat_upstream:
            s_i, e_i, s_j, e_j = float(self.top), float(self.bottom), float(self.left), float(self.right)
        else:
            s_i, e_i = self.top - 0.5, self.bottom + 0.5
            s_j, e_j = self.left - 0.5, self.right + 0.5
        if self.flipped:
            s_j, e_j = e_j, s_j
        return s_i, s_j, e_i, e_j


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def rrc_params(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
    ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` drawn as torchvision's RandomResizedCrop: area ~ U(scale)·H·W, aspect
    log-uniform on ``ratio``, 10 attempts, then a centre crop with the ratio clamped."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, 0, height - h), _randint(generator, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _shift_axis(start: int, size: int, ref_first: int, ref_last: int) -> int:
    """Fixed shift rule on one axis: move ``[start, start+size)`` towards the reference interval
    ``[ref_first, ref_last]`` by the gap, plus half the smaller extent when the overlap is at most
    that; rounded up so the overlap is ≥ ½·e_min before clamping. Returns the new start."""
    ref_size = ref_last - ref_first + 1
    overlap = min(start + size, ref_last + 1) - max(start, ref_first)
    e_min = min(size, ref_size)
    shift = max(0.0, -overlap)
    if overlap <= 0.5 * e_min:
        shift += 0.5 * e_min
    centre_diff = (ref_first + ref_last + 1) / 2 - (start + start + size) / 2
    if centre_diff == 0 or shift == 0:
        return start
    return start + int(math.copysign(math.ceil(shift), centre_diff))


def _shift_compat(i: int, j: int, h: int, w: int, ri: int, rj: int, ri_last: int, rj_last: int
                  ) -> tuple[int, int]:
    """Upstream's shift rule verbatim (``get_params_ref``), including ``min(i, rj)``."""
    rh, rw = ri_last - ri, rj_last - rj
    ri_c, rj_c = (ri_last + ri) / 2, (rj_last + rj) / 2
    last_i, last_j = i + h - 1, j + w - 1
    i_c, j_c = (i + last_i) / 2, (j + last_j) / 2
    bb_h, bb_w = max(last_i, ri_last) - min(i, ri), max(last_j, rj_last) - min(i, rj)
    i_shift = bb_h - h - rh if bb_h > h + rh else 0
    j_shift = bb_w - w - rw if bb_w > w + rw else 0
    h_min, w_min = min(rh, h), min(rw, w)
    i_shift += 0.5 * h_min if bb_h >= h + rh - 0.5 * h_min else 0
    j_shift += 0.5 * w_min if bb_w >= w + rw - 0.5 * w_min else 0
    i += round((ri_c - i_c) / (abs(ri_c - i_c) + 1e-5) * i_shift)
    j += round((rj_c - j_c) / (abs(rj_c - j_c) + 1e-5) * j_shift)
    return i, j


def shifted_params(
    height: int, width: int, scale: tuple[float, float], ref: tuple[int, int, int, int],
    generator: torch.Generator, compat_upstream: bool = False, clamp: bool = True,
) -> tuple[int, int, int, int]:
    """RRC parameters shifted towards the reference box ``ref = (top, left, bottom, right)``
    (inclusive pixels) per axis (spec §2.1.2c), then clamped to the image unless ``clamp=False``."""
    i, j, h, w = rrc_params(height, width, scale, generator)
    ri, rj, ri_last, rj_last = ref
    if compat_upstream:
        i, j = _shift_compat(i, j, h, w, ri, rj, ri_last, rj_last)
    else:
        i = _shift_axis(i, h, ri, ri_last)
        j = _shift_axis(j, w, rj, rj_last)
    if clamp:
        i = min(max(i, 0), height - h)
        j = min(max(j, 0), width - w)
    return i, j, h, w


def _flip(generator: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=generator)) < p


def _ref_of(crop: Crop, compat_upstream: bool) -> tuple[int, int, int, int]:
    """The reference box as upstream reads it (round-trip through normalised coords in compat)."""
    if not compat_upstream:
        return crop.top, crop.left, crop.bottom, crop.right
    c = crop.coords().tolist()
    return _ref_from_coords(c, crop.image_h, crop.image_w)


def _ref_from_coords(c: list[float], height: int, width: int) -> tuple[int, int, int, int]:
    i0, j0, i1, j1 = c
    i0, i1 = min(i0, i1), max(i0, i1)
    j0, j1 = min(j0, j1), max(j0, j1)
    return (round(i0 * (height - 1)), round(j0 * (width - 1)),
            round(i1 * (height - 1)), round(j1 * (width - 1)))


def global_pair(
    height: int, width: int, scale: tuple[float, float], generator: torch.Generator, *,
    pairing: str = "shifted_overlap", hflip: float = 0.5, compat_upstream: bool = False,
) -> tuple[Crop, Crop]:
    """Global crops A and B (spec §2.1.1–2). ``shifted_overlap``: B drawn on the image then shifted
    towards A; ``nested``: B drawn inside A with ``scale`` relative to A's area."""
    if pairing not in PAIRINGS:
        raise UserError(f"unknown global pairing {pairing!r}", f"use one of {', '.join(PAIRINGS)}")
    i, j, h, w = rrc_params(height, width, scale, generator)
    a = Crop(i, j, h, w, height, width, _flip(generator, hflip))
    if pairing == "nested":
        bi, bj, bh, bw = rrc_params(h, w, scale, generator)
        bi, bj = bi + i, bj + j
    else:
        bi, bj, bh, bw = shifted_params(height, width, scale, _ref_of(a, compat_upstream), generator,
                                        compat_upstream)
    b = Crop(bi, bj, bh, bw, height, width, _flip(generator, hflip))
    return a, b


def local_reference(a: Crop, b: Crop, compat_upstream: bool = False) -> tuple[int, int, int, int]:
    """Reference box ``(top, left, bottom, right)`` of the local crops: the true union of the
    unflipped boxes of A and B; compat: upstream's element-wise min/max of the flip-encoded
    coordinates (not the union when exactly one of A, B is mirrored)."""
    if compat_upstream:
        ca, cb = a.coords(), b.coords()
        box = torch.cat([torch.minimum(ca[:2], cb[:2]), torch.maximum(ca[2:], cb[2:])]).tolist()
        return _ref_from_coords(box, a.image_h, a.image_w)
    return (min(a.top, b.top), min(a.left, b.left), max(a.bottom, b.bottom), max(a.right, b.right))


def local_crops(
    height: int, width: int, n: int, scale: tuple[float, float], ref: tuple[int, int, int, int],
    generator: torch.Generator, *, hflip: float = 0.5, compat_upstream: bool = False,
) -> list[Crop]:
    """``n`` local crops, each an RRC draw shifted towards ``ref`` (spec §2.1.3), then flipped."""
    crops = []
    for _ in range(n):
        i, j, h, w = shifted_params(height, width, scale, ref, generator, compat_upstream)
        crops.append(Crop(i, j, h, w, height, width, _flip(generator, hflip)))
    return crops


def srs_mask(size: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """Stratified random sampling mask (spec §3.1): bool ``[size²]`` (row-major) with one token per
    ``window×window`` window of a ``g·w`` square, ``g = size // window``, placed in a random corner
    of the ``size×size`` grid (each p ¼) when ``g·w < size``."""
    if window < 1 or window > size:
        raise UserError(f"SRS window {window} does not fit a {size}×{size} token grid",
                        "use a window between 1 and the number of patches per side")
    g = size // window
    pick = torch.randint(0, window * window, (g * g,), generator=generator)
    corner = _randint(generator, 0, 3)
    spare = size - g * window
    off_i = spare if corner >= 2 else 0
    off_j = spare if corner % 2 == 1 else 0
    k = torch.arange(g * g)
    rows = (k // g) * window + pick // window + off_i
    cols = (k % g) * window + pick % window + off_j
    mask = torch.zeros(size * size, dtype=torch.bool)
    mask[rows * size + cols] = True
    return mask


def _lattice(size: int, compat_upstream: bool) -> torch.Tensor:
    """Fractions ``u`` of the token centres along one axis (see ``Crop.frame``)."""
    if compat_upstream:
        return torch.linspace(0.0, 1.0, size, dtype=torch.float64)
    return (torch.arange(size, dtype=torch.float64) + 0.5) / size


def build_maps(
    sources: list[Crop], mask: torch.Tensor, source_size: int, target: Crop | list[Crop],
    target_size: int, compat_upstream: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_map [n, S, source_size²], tgt_map [n, S, target_size²])`` for the masked samples of
    each source crop against ``target`` (one crop for all, or one per source) (spec §3.2–3.3).

    Valid samples lie strictly inside the target's unflipped box (compat: between its first and
    last pixel centres; fixed: inside its pixel edges). They are packed at the top in ascending
    token order; ``src_map`` rows are one-hot on the source grid, ``tgt_map`` rows the bilinear
    weights on the target grid (the target's flip-encoded frame mirrors columns), summing to 1;
    the remaining rows are zero. All pairs are computed in one vectorised pass.
    """
    targets = [target] * len(sources) if isinstance(target, Crop) else list(target)
    if len(targets) != len(sources):
        raise ValueError("give one target crop, or one per source crop")
    n, f_s, f_t = len(sources), source_size, target_size
    idx = mask.nonzero().squeeze(1)
    samples = idx.numel()
    frames = torch.tensor([c.frame(compat_upstream) for c in sources]
                          + [c.frame(compat_upstream) for c in targets], dtype=torch.float64)
    u = _lattice(f_s, compat_upstream)
    uv = torch.stack([u[idx // f_s], u[idx % f_s]], dim=-1)  # [S, 2]
    s_src, e_src = frames[:n, None, :2], frames[:n, None, 2:]
    pos = s_src + uv * (e_src - s_src)  # [n, S, 2] image positions of the samples
    s, e = frames[n:, None, :2], frames[n:, None, 2:]
    valid = ((pos > torch.minimum(s, e)) & (pos < torch.maximum(s, e))).all(dim=-1)  # [n, S]
    extent = torch.where(e != s, e - s, torch.ones_like(s))  # a 1-pixel target has no valid sample
    cont = (pos - s) / extent
    cont = cont * (f_t - 1) if compat_upstream else cont * f_t - 0.5
    cont = cont.clamp_(0.0, f_t - 1)  # only moves fixed-mode points in a border half patch
    # pack: valid rows first, keeping ascending token order
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    valid_sorted = torch.gather(valid, 1, order)
    weight = valid_sorted.to(torch.float64)
    cont = torch.gather(cont, 1, order[..., None].expand(-1, -1, 2))
    src_map = torch.zeros(n, samples, f_s * f_s)
    src_map.scatter_(2, idx[order][..., None], weight[..., None].float())
    lower = cont.floor().clamp_(max=max(f_t - 2, 0))
    frac = (cont - lower) if f_t > 1 else torch.zeros_like(cont)
    lower = lower.long()
    upper = (lower + 1).clamp_(max=f_t - 1)
    li, lj, ui, uj = lower[..., 0] * f_t, lower[..., 1], upper[..., 0] * f_t, upper[..., 1]
    fi, fj = frac[..., 0], frac[..., 1]
    corners = torch.stack([li + lj, li + uj, ui + lj, ui + uj], dim=-1)
    weights = torch.stack([(1 - fi) * (1 - fj), (1 - fi) * fj, fi * (1 - fj), fi * fj], dim=-1)
    tgt = torch.zeros(n, samples, f_t * f_t, dtype=torch.float64)
    tgt.scatter_add_(2, corners, weights * weight[..., None])
    return src_map, tgt.float()
