"""UDI's multi-crop views: crops + maps per image, photometric ops, the seeded data set and the
batch collation (spec §2, §3; tensor layout in the contract).

A sample (one image) is a dict of tensors:
``globals`` [2, 3, Hg, Wg] and ``locals`` [n, 3, Hl, Wl] (uint8 before the photometric ops, float
normalised after), ``src_global`` / ``tgt_global`` [2, Sg, Ng], ``src_local`` [2, n, Sl, Nl],
``tgt_local`` [2, n, Sl, Ng], ``coords_global`` [2, 4], ``coords_local`` [n, 4]. ``collate_views``
inserts the batch axis B right after the view/crop axes, giving the contract's batch layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as nnf
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from narrows.errors import UserError
from narrows.runtime import derive_seed
from narrows.ssl import geometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
SMALL_BLUR = 48  # crops up to this size are blurred by matrix products, larger by convolution


@dataclass(frozen=True)
class ViewOptions:
    """Geometry and photometric settings of the views (defaults: spec §2 at ViT-S/16 sizes).

    Photometric (§2.2): colour jitter with ``jitter_p`` and strengths (brightness, contrast,
    saturation, hue); grayscale with ``grayscale_p``; then branch (i) with ``blur_branch_p`` —
    blur with p ``blur_p[0]`` or ``blur_p[1]`` (each chosen with p ½) — else branch (ii) — blur with
    p ``blur_p_solarize_branch`` then solarize with ``solarize_p``; blur radius (PIL radius =
    Gaussian sigma, in pixels) ~ U(``blur_radius``).
    """

    global_size: int = 224
    local_size: int = 96
    patch_size: int = 16
    n_local: int = 10
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.25)
    global_window: int = 3
    local_window: int = 2
    global_pairing: str = "shifted_overlap"
    compat_upstream: bool = False
    hflip: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_branch_p: float = 0.5
    blur_p: tuple[float, float] = (0.5, 1.0)
    blur_p_solarize_branch: float = 0.1
    solarize_p: float = 0.2
    blur_radius: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            size = getattr(self, name)
            if size < self.patch_size or size % self.patch_size:
                raise UserError(f"{name} {size} is not a multiple of patch_size {self.patch_size}",
                                "choose crop sizes that are whole numbers of patches")
        if self.n_local < 0:
            raise UserError(f"n_local must be ≥ 0, got {self.n_local}", "pass 0 or more local crops")
        if self.global_pairing not in geometry.PAIRINGS:
            raise UserError(f"unknown global_pairing {self.global_pairing!r}",
                            f"use one of {', '.join(geometry.PAIRINGS)}")
        for name in ("global_scale", "local_scale", "blur_radius"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise UserError(f"{name} must be (low, high) with 0 ≤ low ≤ high", f"got {(low, high)}")
        if self.global_window > self.global_grid or self.local_window > self.local_grid:
            raise UserError("an SRS window is larger than its token grid",
                            f"global grid {self.global_grid}, local grid {self.local_grid}")

    @property
    def global_grid(self) -> int:
        """Patches per side of a global crop (F_g)."""
        return self.global_size // self.patch_size

    @property
    def local_grid(self) -> int:
        """Patches per side of a local crop (F_l)."""
        return self.local_size // self.patch_size


def _to_uint8_rgb(image: torch.Tensor) -> torch.Tensor:
    if image.ndim != 3:
        raise UserError(f"views expect a C×H×W image, got shape {tuple(image.shape)}",
                        "pass one image at a time")
    if image.dtype != torch.uint8:
        if not image.is_floating_point():
            raise UserError(f"images must be uint8 or float in [0, 1], got {image.dtype}",
                            "convert the image first")
        image = image.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    channels = image.shape[0]
    if channels == 1:
        image = image.expand(3, -1, -1)
    elif channels != 3:
        raise UserError(f"images must have 1 or 3 channels, got {channels}", "convert to RGB")
    return image


class MultiCropViews:
    """Geometric part of the views: ``views(image, generator) -> sample dict`` (module docstring).

    ``image``: C×H×W uint8 or float in [0, 1], 1 or 3 channels, any size. Crop, flip and resize
    (bicubic, antialiased) run on the tensor; crops come back uint8, photometric ops not applied.
    """

    def __init__(self, options: ViewOptions) -> None:
        self.options = options

    def _crop(self, image: torch.Tensor, crop: geometry.Crop, size: int) -> torch.Tensor:
        """Crop, resize to ``size``², then mirror (resizing commutes with mirroring; cheaper after)."""
        patch = image[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
        out = tvf.resize(patch, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return out.flip(-1) if crop.flipped else out

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        o = self.options
        image = _to_uint8_rgb(image)
        height, width = image.shape[-2:]
        a, b = geometry.global_pair(height, width, o.global_scale, generator, pairing=o.global_pairing,
                                    hflip=o.hflip, compat_upstream=o.compat_upstream)
        ref = geometry.local_reference(a, b, o.compat_upstream)
        locs = geometry.local_crops(height, width, o.n_local, o.local_scale, ref, generator,
                                    hflip=o.hflip, compat_upstream=o.compat_upstream)
        fg, fl = o.global_grid, o.local_grid
        mask_g = geometry.srs_mask(fg, o.global_window, generator)
        mask_l = geometry.srs_mask(fl, o.local_window, generator)
        src_global, tgt_global = geometry.build_maps([a, b], mask_g, fg, [b, a], fg, o.compat_upstream)
        sl = int(mask_l.sum())
        if locs:
            n = len(locs)
            src_local, tgt_local = geometry.build_maps(locs + locs, mask_l, fl, [a] * n + [b] * n, fg,
                                                       o.compat_upstream)
            src_local = src_local.view(2, n, sl, fl * fl)
            tgt_local = tgt_local.view(2, n, sl, fg * fg)
            locals_ = torch.stack([self._crop(image, c, o.local_size) for c in locs])
            coords_local = torch.stack([c.coords() for c in locs])
        else:
            src_local = torch.zeros(2, 0, sl, fl * fl)
            tgt_local = torch.zeros(2, 0, sl, fg * fg)
            locals_ = torch.zeros(0, 3, o.local_size, o.local_size, dtype=torch.uint8)
            coords_local = torch.zeros(0, 4)
        return {
            "globals": torch.stack([self._crop(image, c, o.global_size) for c in (a, b)]),
            "locals": locals_,
            "src_global": src_global,
            "tgt_global": tgt_global,
            "src_local": src_local,
            "tgt_local": tgt_local,
            "coords_global": torch.stack([a.coords(), b.coords()]),
            "coords_local": coords_local,
        }


@dataclass
class PhotometricParams:
    """Per-crop random decisions of the photometric ops (all tensors with leading dim N).

    ``jitter`` bool, ``factors`` [N, 4] (brightness, contrast, saturation multipliers; hue shift in
    turns), ``order`` [N, 4] the permutation in which the four jitter ops run, ``gray``, ``blur``
    bool, ``sigma`` blur sigma in pixels, ``solarize`` bool.
    """

    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def select(self, index: torch.Tensor | slice) -> PhotometricParams:
        """The parameters of a subset of the crops."""
        return PhotometricParams(*(getattr(self, f.name)[index] for f in fields(self)))

    def to(self, device: torch.device | str) -> PhotometricParams:
        return PhotometricParams(*(getattr(self, f.name).to(device) for f in fields(self)))


def draw_photometric(n: int, options: ViewOptions, generator: torch.Generator) -> PhotometricParams:
    """Draw the decisions of ``n`` crops from ``generator`` (one draw, on the generator's device)."""
    o = options
    dev = generator.device
    u = torch.rand(n, 15, generator=generator, device=dev)
    low = torch.tensor([max(1 - o.brightness, 0.0), max(1 - o.contrast, 0.0),
                        max(1 - o.saturation, 0.0), -o.hue], device=dev)
    high = torch.tensor([1 + o.brightness, 1 + o.contrast, 1 + o.saturation, o.hue], device=dev)
    factors = low + u[:, 1:5] * (high - low)
    order = u[:, 5:9].argsort(dim=1)
    branch_i = u[:, 10] < o.blur_branch_p
    p_blur = torch.where(branch_i, torch.where(u[:, 11] < 0.5, o.blur_p[0], o.blur_p[1]),
                         o.blur_p_solarize_branch)
    blur = (u[:, 12] <= p_blur) & (p_blur > 0)
    sigma = o.blur_radius[0] + u[:, 13] * (o.blur_radius[1] - o.blur_radius[0])
    solarize = ~branch_i & (u[:, 14] < o.solarize_p)
    return PhotometricParams(u[:, 0] < o.jitter_p, factors, order, u[:, 9] < o.grayscale_p, blur,
                             sigma, solarize)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a [1, len, 1, 1] tensor on ``like``'s device and dtype (cached)."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
    return _CONSTANTS[key]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB [M, 3, H, W] with PIL's weights, as [M, 1, H, W]."""
    return (x * _constant(GRAY_WEIGHTS, x)).sum(dim=-3, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor·x + (1 − factor)·other`` per image, clamped to [0, 1]."""
    return torch.lerp(other.expand_as(x), x, factor.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0, 1)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of float RGB images [M, 3, H, W] by ``shift`` [M] turns: HSV hue h (sector
    units, [0, 6)) moved, value and saturation kept; out = min + chroma·ramp_c(h)."""
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    inv = chroma.clamp(min=1e-12).reciprocal_().mul_(chroma > 0)
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h6 = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g)).mul_(inv)
    h6 += is_g * 2.0 + (~(is_r | is_g)) * 4.0
    h6.add_((shift * 6.0).view(-1, 1, 1))
    h6 -= torch.floor(h6 / 6.0) * 6.0
    # ramps of R, G, B over the sector position: |h−3|−1, 2−|h−2|, 2−|h−4|, clamped to [0, 1]
    ramp = (h6.unsqueeze(1) - _constant((3.0, 2.0, 4.0), x)).abs_()
    ramp = ramp.mul_(_constant((1.0, -1.0, -1.0), x)).add_(_constant((-1.0, 2.0, 2.0), x)).clamp_(0, 1)
    return ramp.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


def _blur(x: torch.Tensor, sigma: torch.Tensor, matmul: bool | None = None) -> torch.Tensor:
    """Separable Gaussian blur of [M, 3, H, W] with per-image ``sigma`` [M]; each kernel is
    truncated at ±ceil(3σ) of its own sigma; borders replicated (as PIL's blur does). Small crops
    go through two batched products with [M, n, n] blur matrices, large ones through a grouped
    convolution (the same operator, cheaper at that size)."""
    m, c, h, w = x.shape
    radius = int(math.ceil(3.0 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).view(-1, 1)
    kernel = torch.exp(-0.5 * (taps / s) ** 2)
    kernel = kernel * (taps.abs() <= torch.ceil(3.0 * s))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [M, k]
    if matmul if matmul is not None else max(h, w) <= SMALL_BLUR:
        def matrix(size: int) -> torch.Tensor:
            cols = (torch.arange(size, device=x.device)[:, None] + taps.long()[None]).clamp_(0, size - 1)
            mat = torch.zeros(m, size, size, dtype=x.dtype, device=x.device)
            k = taps.numel()
            return mat.scatter_add_(2, cols.expand(m, size, k), kernel[:, None, :].expand(m, size, k))
        rows = matrix(h)[:, None]
        cols_t = matrix(w).transpose(1, 2)[:, None]
        return torch.matmul(torch.matmul(rows, x), cols_t)
    kernel = kernel.repeat_interleave(c, dim=0)  # [M·3, k]
    flat = x.reshape(1, m * c, h, w)
    flat = nnf.pad(flat, (radius, radius, radius, radius), mode="replicate")
    flat = nnf.conv2d(flat, kernel.view(m * c, 1, -1, 1), groups=m * c)
    flat = nnf.conv2d(flat, kernel.view(m * c, 1, 1, -1), groups=m * c)
    return flat.view(m, c, h, w)


def apply_photometric(crops: torch.Tensor, params: PhotometricParams,
                      options: ViewOptions) -> torch.Tensor:
    """Apply drawn decisions to uint8 crops [N, 3, H, W]; returns float32 normalised crops.

    Colour jitter (its four ops in each crop's own random order, clamped to [0, 1] after each),
    grayscale, Gaussian blur, solarize (pixels ≥ 128/255 inverted), normalise — each op runs once,
    vectorised over the crops that take it.
    """
    params = params.to(crops.device)
    x = crops.float().div_(255.0)
    n = x.shape[0]
    dev = x.device
    jitter, order = params.jitter.tolist(), params.order.tolist()

    def update(members: list[int], fn) -> None:
        if not members:
            return
        if members[-1] - members[0] + 1 == len(members):  # a contiguous run: a view, no gather
            run = slice(members[0], members[-1] + 1)
            x[run] = fn(x[run], run)
        else:
            idx = torch.tensor(members, device=dev)
            x[idx] = fn(x[idx], idx)

    def jitter_op(op: int):
        def fn(sub: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
            f = params.factors[idx, op]
            if op == 0:
                return (sub * f.view(-1, 1, 1, 1)).clamp_(0, 1)
            if op == 1:
                return _blend(sub, _gray(sub).mean(dim=(-3, -2, -1), keepdim=True), f)
            if op == 2:
                return _blend(sub, _gray(sub), f)
            return _hue(sub, f)
        return fn

    for stage in range(4):
        for op in range(4):
            update([k for k in range(n) if jitter[k] and order[k][stage] == op], jitter_op(op))

    def members(flags: torch.Tensor) -> list[int]:
        return [k for k, flag in enumerate(flags.tolist()) if flag]

    update(members(params.gray), lambda sub, idx: _gray(sub).expand(-1, 3, -1, -1))
    update(members(params.blur), lambda sub, idx: _blur(sub, params.sigma[idx]))
    update(members(params.solarize),
           lambda sub, idx: torch.where(sub >= 128.0 / 255.0, 1.0 - sub, sub))
    return x.sub_(_constant(options.mean, x)).div_(_constant(options.std, x))


def photometric(crops: torch.Tensor, options: ViewOptions, generator: torch.Generator) -> torch.Tensor:
    """Spec §2.2 on a batch of uint8 crops [N, 3, H, W] (any device), each crop with its own
    decisions drawn from ``generator``, probabilities and normalisation from ``options`` (a
    :class:`ViewOptions`); returns float32 normalised crops on the crops' device."""
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
        raise UserError(f"photometric ops expect uint8 crops [N, 3, H, W], got {crops.dtype} "
                        f"{tuple(crops.shape)}", "apply them to the views' uint8 crops")
    return apply_photometric(crops, draw_photometric(crops.shape[0], options, generator), options)


class ViewDataset(Dataset):
    """Views of a base data set; item ``i`` in epoch ``e`` is drawn from a generator seeded with
    ``derive_seed(seed, e, i)``, so samples do not depend on worker count or order.

    Base items: ``(image, label)`` (label ignored) or a bare image (tensor or PIL). A
    ``TensorImageDataset`` without a transform is read from its uint8 ``images`` directly. With
    ``photometric_in_workers`` the crops come back float normalised, otherwise uint8 (apply
    ``photometric`` later, e.g. batched on the GPU). Call ``set_epoch`` before each epoch (with
    persistent DataLoader workers, recreate the loader instead: workers hold copies).
    """

    def __init__(self, dataset: Dataset, views: MultiCropViews, seed: int,
                 photometric_in_workers: bool = True) -> None:
        self.dataset = dataset
        self.views = views
        self.seed = int(seed)
        self.epoch = 0
        self.photometric_in_workers = photometric_in_workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _image(self, index: int) -> torch.Tensor:
        from narrows.data.base import TensorImageDataset

        base = self.dataset
        if isinstance(base, TensorImageDataset) and base.transform is None:
            return base.images[index]
        item = base[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, torch.Tensor):
            item = tvf.pil_to_tensor(item)
        return item

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))
        sample = self.views(self._image(index), generator)
        if self.photometric_in_workers:
            opts = self.views.options
            sample["globals"] = photometric(sample["globals"], opts, generator)
            if sample["locals"].shape[0]:
                sample["locals"] = photometric(sample["locals"], opts, generator)
            else:
                sample["locals"] = sample["locals"].float()
        return sample


# batch axis position per key (after the view / crop axes)
BATCH_DIM = {
    "globals": 1, "locals": 1, "src_global": 1, "tgt_global": 1, "src_local": 2, "tgt_local": 2,
    "coords_global": 1, "coords_local": 1,
}


def collate_views(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-image samples into the contract's batch layout (B after the view/crop axes)."""
    if not samples:
        raise UserError("cannot collate an empty list of samples", "use a batch size ≥ 1")
    return {key: torch.stack([s[key] for s in samples], dim=dim) for key, dim in BATCH_DIM.items()}
