"""Synthetic shapes on textured backgrounds: a small localisation set with exact boxes and masks.

Each image holds one shape (its class) in a random colour, at a random position, scale and
small rotation, over a random texture (smooth colour noise, stripes or a checkerboard), so the
class can only be told from the outline. Image ``i`` of a split is drawn from its own generator,
seeded by ``(seed, split, i)``: the set is the same on every machine and for any count, and the
first ``n`` images do not change when more are asked for.

With ``objects=N`` (N > 1) each image holds N shapes of random classes (repeats allowed), each
in its own contrasting colour, placed so that their circumcircles overlap as little as a few
random tries find; later shapes are drawn over earlier ones. An object hidden entirely by later
ones is not counted. The image's ``label`` is then the class of the object with the most visible
pixels (ties: the earlier drawn), and :class:`ShapesDataset` adds the multi-label targets,
per-object boxes and masks and a per-pixel class map. ``objects=1`` is the original data set,
bit for bit.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel ``j`` covers ``[j, j+1)``),
the tight box of the (visible part of the) mask: ``x0`` is the first masked column and ``x1``
one past the last.
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
            "rmax": 42, "objects": 1}
LIMITS = {
    "classes": (2, len(SHAPE_KINDS)),
    "size": (16, 256),
    "train": (1, 1_000_000),
    "test": (1, 1_000_000),
    "seed": (0, 2**32 - 1),
    "rmin": (5, 45),
    "rmax": (5, 45),
    "objects": (1, 16),
}
SPLIT_IDS = {"train": 0, "test": 1}  # part of the data set's definition: never change them
MAX_TILT = math.radians(15)  # small, so that a square never turns into a diamond
# rmin/rmax: the shape's circumradius in percent of the image size (default 22..42 %; the
# attribution study uses 10..20 %, so that boxes cover a small part of the image)
PIXEL_NOISE = 0.03
OPTIONS_FIX = (
    f"valid options: {', '.join(DEFAULTS)}; write them as "
    "shapes:classes=4,size=64,train=2000,test=500,seed=0,rmin=22,rmax=42,objects=1"
)
# objects=N > 1: N circumcircles of the smallest radius may cover at most this share of the
# image (random sequential placement of equal disks jams near 54.7 % coverage), and each object
# needs a circumradius of a few pixels to keep its outline
JAMMING_COVERAGE = 0.547
MIN_OBJECT_RADIUS_PX = 3.0
PLACEMENT_TRIES = 50  # random positions tried per object before the least overlapping is kept


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
    if values["objects"] > 1:
        _check_room(values)
    for split in ("train", "test"):
        if values[split] < values["classes"]:
            raise UserError(
                f"shapes option {split}={values[split]} is fewer than classes={values['classes']}",
                f"give each split at least one image per class: {split}>={values['classes']}",
            )
    return values


def _check_room(values: dict[str, int]) -> None:
    """Raise a :class:`UserError` when ``objects`` shapes cannot be placed apart at this size."""
    objects, rmin, size = values["objects"], values["rmin"], values["size"]
    if rmin / 100 * size < MIN_OBJECT_RADIUS_PX:
        raise UserError(
            f"shapes option objects={objects} needs larger shapes: rmin={rmin} % of size={size} "
            f"is a circumradius of {rmin / 100 * size:.1f} px",
            f"give each object at least {MIN_OBJECT_RADIUS_PX:g} px: raise size to "
            f">= {math.ceil(MIN_OBJECT_RADIUS_PX * 100 / rmin)} or rmin",
        )
    disk = math.pi * (rmin / 100) ** 2
    if objects * disk > JAMMING_COVERAGE:
        most = max(1, int(JAMMING_COVERAGE // disk))
        biggest = math.floor(100 * math.sqrt(JAMMING_COVERAGE / (objects * math.pi)))
        raise UserError(
            f"shapes option objects={objects} does not fit: {objects} shapes of circumradius "
            f"rmin={rmin} % cover {objects * disk:.0%} of the image, more than random placement "
            f"can keep apart ({JAMMING_COVERAGE:.0%})",
            f"use objects<={most} at rmin={rmin}, or lower rmin to <={biggest} (rmax with it) for "
            f"objects={objects}, e.g. rmin=10,rmax=20",
        )


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


class ShapesDataset(TensorImageDataset):
    """A shapes split: a :class:`TensorImageDataset` with per-object and per-pixel targets.

    ``labels[i]`` is one class per image: with several objects, the class of the object with the
    most visible pixels. ``masks`` (``N×H×W`` bool) is the union of all objects. Per image, the
    ``K`` visible objects (``K <= objects``, in drawing order) share one order across
    ``boxes(i)`` (``K×4``), ``object_classes(i)`` and ``object_masks(i)``.

    ``class_masks``: ``N×H×W`` int64, 0 for background and ``c + 1`` where class ``c`` is the
    topmost object. ``instance_masks``: ``N×H×W`` uint8, 0 for background and ``k + 1`` on the
    visible pixels of object ``k``. ``multilabel_targets``: ``N×num_classes`` bool, the classes
    with visible pixels (``targets`` stays the list of single labels, as in every data set).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        boxes: list[torch.Tensor],
        masks: torch.Tensor,
        class_masks: torch.Tensor,
        instance_masks: torch.Tensor,
        object_class_list: list[torch.Tensor],
        num_classes: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(images, labels, boxes=boxes, masks=masks, transform=transform)
        count, _, height, width = images.shape
        if class_masks.shape != (count, height, width) or instance_masks.shape != (
            count, height, width
        ):
            raise ValueError("class_masks and instance_masks must be N×H×W like the images")
        if len(object_class_list) != count:
            raise ValueError("object_class_list must have one K tensor per image")
        self.class_masks = class_masks
        self.instance_masks = instance_masks
        self.object_class_list = object_class_list
        self.num_classes = num_classes
        present = torch.zeros(count, num_classes, dtype=torch.bool)
        for i, classes in enumerate(object_class_list):
            present[i, classes] = True
        self.multilabel_targets = present

    def with_transform(self, transform: Callable | None) -> ShapesDataset:
        """The same tensors (not copied) with another per-sample transform."""
        return ShapesDataset(
            self.images, self.labels, boxes=self.box_list, masks=self.masks,
            class_masks=self.class_masks, instance_masks=self.instance_masks,
            object_class_list=self.object_class_list, num_classes=self.num_classes,
            transform=transform,
        )

    def multilabel(self, index: int) -> torch.Tensor:
        """The ``num_classes`` bool vector of the classes visible in image ``index``."""
        return self.multilabel_targets[index]

    def object_classes(self, index: int) -> torch.Tensor:
        """The ``K`` int64 classes of the visible objects of image ``index`` (rows of ``boxes``)."""
        return self.object_class_list[index]

    def object_masks(self, index: int) -> torch.Tensor:
        """The ``K×H×W`` bool visible masks of the objects of image ``index`` (disjoint)."""
        ids = torch.arange(1, len(self.object_class_list[index]) + 1, dtype=torch.uint8)
        return self.instance_masks[index][None] == ids[:, None, None]


def _place(
    rng: np.random.Generator, radius: float, placed: list[tuple[float, float, float]], size: int
) -> tuple[float, float]:
    """A centre for a circumcircle of ``radius`` inside the image, apart from ``placed`` circles.

    Tries :data:`PLACEMENT_TRIES` random centres; the first without overlap wins, else the one
    whose deepest overlap (sum of radii minus distance, in pixels) is the smallest.
    """
    best, best_depth = (0.0, 0.0), math.inf
    for _ in range(PLACEMENT_TRIES):
        cx, cy = rng.uniform(radius, size - radius, size=2)
        depth = max((r + radius - math.hypot(cx - x, cy - y) for x, y, r in placed), default=0.0)
        if depth <= 0:
            return float(cx), float(cy)
        if depth < best_depth:
            best, best_depth = (float(cx), float(cy)), depth
    return best


def render_scene(
    seed: int, split: str, index: int, *, classes: int, size: int, objects: int,
    radius_range: tuple[float, float] = (0.22, 0.42),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Image ``index`` of a split with ``objects`` shapes (``objects > 1``).

    Returns ``(3×size×size uint8 image, size×size uint8 instance map, K int64 classes, label)``:
    the map holds ``k + 1`` on the visible pixels of the ``k``-th visible object (drawing order)
    and 0 on background; ``label`` is the class of the object with the most visible pixels.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index, objects]))
    kinds = rng.integers(classes, size=objects)
    image, palette = _background(rng, size)
    topmost = np.zeros((size, size), dtype=np.uint8)  # 1 + the last object drawn on each pixel
    placed: list[tuple[float, float, float]] = []
    for k, kind in enumerate(kinds):
        radius = rng.uniform(*radius_range) * size
        cx, cy = _place(rng, radius, placed, size)
        tilt = rng.uniform(-MAX_TILT, MAX_TILT)
        mask = shape_mask(SHAPE_KINDS[kind], size, cx, cy, radius, tilt)
        colour = _contrasting_colour(rng, palette)
        image[mask] = colour
        topmost[mask] = k + 1
        palette = np.concatenate([palette, colour[None]])
        placed.append((cx, cy, radius))
    image += rng.standard_normal(image.shape, dtype=np.float32) * PIXEL_NOISE
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    visible = np.bincount(topmost.ravel(), minlength=objects + 1)[1:]
    shown = np.flatnonzero(visible)
    renumber = np.zeros(objects + 1, dtype=np.uint8)
    renumber[shown + 1] = np.arange(1, len(shown) + 1)
    label = int(kinds[np.argmax(visible)]) if len(shown) else int(kinds[-1])
    return pixels.transpose(2, 0, 1), renumber[topmost], kinds[shown].astype(np.int64), label


def generate_split(
    split: str, count: int, *, classes: int, size: int, seed: int,
    radius_range: tuple[float, float] = (0.22, 0.42), objects: int = 1,
) -> ShapesDataset:
    """``count`` images of a split with ``objects`` shapes each, their boxes, masks and targets."""
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    instances = np.empty((count, size, size), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    object_classes = []
    for i in range(count):
        if objects == 1:  # the original single-shape images, unchanged
            images[i], mask, labels[i] = render(seed, split, i, classes=classes, size=size,
                                                radius_range=radius_range)
            instances[i] = mask
            object_classes.append(np.array([labels[i]], dtype=np.int64))
        else:
            images[i], instances[i], kinds, labels[i] = render_scene(
                seed, split, i, classes=classes, size=size, objects=objects,
                radius_range=radius_range,
            )
            object_classes.append(kinds)
    boxes = [
        torch.from_numpy(np.stack([mask_box(ids == k + 1) for k in range(len(kinds))]))
        if len(kinds) else torch.zeros(0, 4)
        for ids, kinds in zip(instances, object_classes, strict=True)
    ]
    # class map: 0 background, c + 1 for class c (a lookup per image: instance k -> its class)
    lookup = np.zeros((count, objects + 1), dtype=np.int64)
    for i, kinds in enumerate(object_classes):
        lookup[i, 1 : len(kinds) + 1] = kinds + 1
    class_masks = np.take_along_axis(lookup, instances.reshape(count, -1).astype(np.int64), axis=1)
    return ShapesDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels),
        boxes=boxes,
        masks=torch.from_numpy(instances > 0),
        class_masks=torch.from_numpy(class_masks.reshape(count, size, size)),
        instance_masks=torch.from_numpy(instances),
        object_class_list=[torch.from_numpy(kinds) for kinds in object_classes],
        num_classes=classes,
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
        radius_range=(opts["rmin"] / 100, opts["rmax"] / 100), objects=opts["objects"],
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

    def factory(base: Callable[[], ShapesDataset]) -> Callable[[str], ShapesDataset]:
        return lambda augment: base().with_transform(tensor_augmentation(augment, opts["size"]))

    return DataBundle(info, {"train": factory(lambda: train), "test": factory(test)})
