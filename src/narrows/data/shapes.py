"""Synthetic shapes on textured backgrounds: a small localisation set with exact boxes and masks.

Each image holds one shape (its class) in a random colour, at a random position, scale and
small rotation, over a random texture (smooth colour noise, stripes or a checkerboard), so the
class can only be told from the outline. Image ``i`` of a split is drawn from its own generator,
seeded by ``(seed, split, i)``: the set is the same on every machine and for any count, and the
first ``n`` images do not change when more are asked for.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel ``j`` covers ``[j, j+1)``),
the tight box of the mask: ``x0`` is the first masked column and ``x1`` one past the last.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch

from narrows.data.augment import tensor_augmentation
from narrows.data.base import DataBundle, DataInfo, TensorImageDataset
from narrows.errors import UserError

SHAPE_KINDS = ("circle", "square", "triangle", "plus", "ring", "diamond", "star", "ellipse")
DEFAULTS = {"classes": 4, "size": 64, "train": 2000, "test": 500, "seed": 0, "rmin": 22,
            "rmax": 42}
LIMITS = {
    "classes": (2, len(SHAPE_KINDS)),
    "size": (16, 256),
    "train": (1, 1_000_000),
    "test": (1, 1_000_000),
    "seed": (0, 2**32 - 1),
    "rmin": (5, 45),
    "rmax": (5, 45),
}
SPLIT_IDS = {"train": 0, "test": 1}  # part of the data set's definition: never change them
MAX_TILT = math.radians(15)  # small, so that a square never turns into a diamond
# rmin/rmax: the shape's circumradius in percent of the image size (default 22..42 %; the
# attribution study uses 10..20 %, so that boxes cover a small part of the image)
PIXEL_NOISE = 0.03
OPTIONS_FIX = (
    f"valid options: {', '.join(DEFAULTS)}; write them as "
    "shapes:classes=4,size=64,train=2000,test=500,seed=0,rmin=22,rmax=42"
)


# --- options -------------------------------------------------------------------------------


def parse_options(options: str) -> dict[str, int]:
    """The ``k=v,k=v`` options of a shapes spec, with defaults filled in and ranges checked."""
    values = dict(DEFAULTS)
    for item in options.split(",") if options.strip() else []:
        key, eq, raw = (part.strip() for part in item.partition("="))
        key = key.lower()
        if key not in DEFAULTS:
            raise UserError(f"unknown shapes option '{key}'", OPTIONS_FIX)
        if not eq or not raw:
            raise UserError(f"shapes option '{key}' needs a value", OPTIONS_FIX)
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"shapes option {key}={raw} is not an integer", OPTIONS_FIX) from None
        low, high = LIMITS[key]
        if not low <= value <= high:
            raise UserError(
                f"shapes option {key}={value} is out of range",
                f"use {low} <= {key} <= {high}",
            )
        values[key] = value
    if values["rmin"] > values["rmax"]:
        raise UserError(f"shapes option rmin={values['rmin']} is above rmax={values['rmax']}",
                        "give rmin <= rmax (circumradius in percent of the image size)")
    for split in ("train", "test"):
        if values[split] < values["classes"]:
            raise UserError(
                f"shapes option {split}={values[split]} is fewer than classes={values['classes']}",
                f"give each split at least one image per class: {split}>={values['classes']}",
            )
    return values


# --- shapes: boolean masks over rotated unit coordinates -------------------------------------


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, first_normal: float) -> np.ndarray:
    """Inside a regular polygon of circumradius 1 whose first edge normal points at ``first_normal``."""
    angles = first_normal + 2 * math.pi * np.arange(sides) / sides
    reach = np.max([u * math.cos(a) + v * math.sin(a) for a in angles], axis=0)  # support distance
    return reach <= math.cos(math.pi / sides)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Inside a star with one point up: per wedge, the origin's side of the outer-inner edge."""
    rho = np.hypot(u, v)
    wedge = 2 * math.pi / points
    t = np.mod(np.arctan2(u, v), wedge)
    s = np.minimum(t, wedge - t)  # angle from the nearest point, in [0, wedge/2]
    px, py = rho * np.cos(s), rho * np.sin(s)
    ix, iy = inner * math.cos(wedge / 2), inner * math.sin(wedge / 2)
    return (ix - 1) * py - iy * (px - 1) >= 0


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": lambda u, v: u * u + v * v <= 1,
    "square": lambda u, v: _regular_polygon(u, v, 4, 0.0),
    "triangle": lambda u, v: _regular_polygon(u, v, 3, -math.pi / 2),
    "plus": lambda u, v: (
        ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    ),
    "ring": lambda u, v: (u * u + v * v <= 1) & (u * u + v * v >= 0.55**2),
    "diamond": lambda u, v: _regular_polygon(u, v, 4, math.pi / 4),
    "star": _star,
    "ellipse": lambda u, v: u * u + (v / 0.5) ** 2 <= 1,
}


@functools.lru_cache(maxsize=4)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of every pixel centre, each ``size×size`` (row = y)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)


def shape_mask(
    kind: str, size: int, cx: float, cy: float, radius: float, tilt: float
) -> np.ndarray:
    """The ``size×size`` bool mask of one shape; ``tilt`` in radians, counter-clockwise."""
    x, y = _pixel_centres(size)
    dx, dy = (x - cx) / radius, (cy - y) / radius  # y up, so "up" means up on screen
    c, s = math.cos(tilt), math.sin(tilt)
    return _SHAPES[kind](c * dx + s * dy, -s * dx + c * dy)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The tight ``(x0, y0, x1, y1)`` box of a non-empty mask; ``x1``/``y1`` are one past the end."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


# --- backgrounds ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _upsample_matrix(size: int, cells: int) -> np.ndarray:
    """``size×cells`` linear-interpolation weights from a coarse grid to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    low = np.minimum(np.floor(pos).astype(int), cells - 2)
    frac = (pos - low).astype(np.float32)
    weights = np.zeros((size, cells), dtype=np.float32)
    weights[np.arange(size), low] = 1 - frac
    weights[np.arange(size), low + 1] = frac
    return weights


def _smooth_noise(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    grid = rng.random((4, 4, 3), dtype=np.float32)
    up = _upsample_matrix(size, 4)
    channels = [up @ grid[:, :, c] @ up.T for c in range(3)]
    return np.stack(channels, axis=-1), grid.reshape(-1, 3)


def _two_colour(
    rng: np.random.Generator, size: int, checker: bool
) -> tuple[np.ndarray, np.ndarray]:
    colours = rng.random((2, 3), dtype=np.float32)
    period = rng.uniform(size / 10, size / 3)
    angle = rng.uniform(0, math.pi)
    phase = rng.uniform(0, period)
    x, y = _pixel_centres(size)
    along = (x * math.cos(angle) + y * math.sin(angle) + phase) / period
    parity = np.floor(along).astype(np.int64)
    if checker:
        across = (-x * math.sin(angle) + y * math.cos(angle) + phase) / period
        parity = parity + np.floor(across).astype(np.int64)
    return colours[parity % 2], colours


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``size×size×3`` texture in [0, 1] and the palette of its colours (``K×3``)."""
    texture = rng.integers(3)
    if texture == 0:
        return _smooth_noise(rng, size)
    return _two_colour(rng, size, checker=texture == 2)


def _contrasting_colour(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    """Of a few random colours, the one farthest from every colour of the background."""
    candidates = rng.random((8, 3), dtype=np.float32)
    distance = np.linalg.norm(candidates[:, None] - palette[None], axis=-1).min(axis=1)
    return candidates[np.argmax(distance)]


# --- images and splits ---------------------------------------------------------------------


def render(
    seed: int, split: str, index: int, *, classes: int, size: int,
    radius_range: tuple[float, float] = (0.22, 0.42),
) -> tuple[np.ndarray, np.ndarray, int]:
    """Image ``index`` of a split: ``(3×size×size uint8, size×size bool mask, label)``.

    ``radius_range``: the circumradius's range as fractions of ``size``.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))
    label = index % classes
    radius = rng.uniform(*radius_range) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    tilt = rng.uniform(-MAX_TILT, MAX_TILT)
    mask = shape_mask(SHAPE_KINDS[label], size, cx, cy, radius, tilt)
    image, palette = _background(rng, size)
    image[mask] = _contrasting_colour(rng, palette)
    image += rng.standard_normal(image.shape, dtype=np.float32) * PIXEL_NOISE
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return pixels.transpose(2, 0, 1), mask, label


def generate_split(
    split: str, count: int, *, classes: int, size: int, seed: int,
    radius_range: tuple[float, float] = (0.22, 0.42),
) -> TensorImageDataset:
    """``count`` images of a split, with their boxes (one ``1×4`` tensor each) and masks."""
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=bool)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        images[i], masks[i], labels[i] = render(seed, split, i, classes=classes, size=size,
                                                   radius_range=radius_range)
    boxes = [torch.from_numpy(mask_box(mask))[None] for mask in masks]
    return TensorImageDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        boxes=boxes,
        masks=torch.from_numpy(masks),
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of uint8 ``N×C×H×W`` images scaled to [0, 1]."""
    means, stds = [], []
    for c in range(images.shape[1]):
        values = images[:, c].double().div_(255.0)
        means.append(float(values.mean()))
        stds.append(float(values.std()))
    return tuple(means), tuple(stds)


def load_shapes_bundle(spec: str, options: str) -> DataBundle:
    """The shapes data set of ``options`` (``""`` or ``"k=v,..."``); test is built on first use."""
    opts = parse_options(options)
    make = functools.partial(
        generate_split, classes=opts["classes"], size=opts["size"], seed=opts["seed"],
        radius_range=(opts["rmin"] / 100, opts["rmax"] / 100),
    )
    train = make("train", opts["train"])
    mean, std = channel_stats(train.images)
    info = DataInfo(
        spec=spec,
        name="shapes",
        num_classes=opts["classes"],
        class_names=SHAPE_KINDS[: opts["classes"]],
        mean=mean,
        std=std,
        image_size=opts["size"],
        has_boxes=True,
        has_masks=True,
        default_augment="crop-flip",
    )
    test = functools.cache(lambda: make("test", opts["test"]))

    def factory(base: Callable[[], TensorImageDataset]) -> Callable[[str], TensorImageDataset]:
        return lambda augment: base().with_transform(tensor_augmentation(augment, opts["size"]))

    return DataBundle(info, {"train": factory(lambda: train), "test": factory(test)})
