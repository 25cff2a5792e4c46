"""Image files on disk: ImageNet (ILSVRC class folders, with box XMLs) and class-per-folder sets.

Both serve images through :class:`ImageFileDataset`: the evaluation view is
``Resize(size·256/224)`` then ``CenterCrop(size)``. Listing a split never decodes an image, and
only the splits that are asked for are listed (the test split is listed when the data set is
loaded, to know whether it has boxes; the ImageNet train split only when training asks for it).

Boxes come from PASCAL VOC XML files (the ILSVRC format). Their ``xmin``..``ymax`` are taken as
pixel coordinates of the original image, as they are written, and :meth:`ImageFileDataset.boxes`
maps them into the served image.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from narrows.data.base import AUGMENTS, DataBundle, DataInfo
from narrows.errors import UserError
from narrows.notes import note_once

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VOC_FORMAT = "PASCAL VOC XML: <annotation><size><width>..</size><object><bndbox><xmin>.."


# --- geometry of the evaluation view -------------------------------------------------------


def resize_size(image_size: int) -> int:
    """The shorter side before the centre crop (256 for 224)."""
    return int(image_size * 256 / 224)


def eval_geometry(width: int, height: int, image_size: int) -> tuple[float, float, int, int]:
    """``(scale_x, scale_y, left, top)`` of the eval view, with torchvision's rounding."""
    short = resize_size(image_size)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return new_w / width, new_h / height, left, top


def boxes_to_eval_view(boxes: np.ndarray, width: int, height: int, image_size: int) -> torch.Tensor:
    """Map ``K×4`` xyxy boxes of a ``width×height`` image into the eval view.

    Boxes are clipped to the crop; those left with no area (entirely cropped away) are dropped.
    """
    scale_x, scale_y, left, top = eval_geometry(width, height, image_size)
    scale = np.array([scale_x, scale_y, scale_x, scale_y])
    shift = np.array([left, top, left, top])
    mapped = np.clip(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale - shift, 0, image_size
    )
    keep = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
    return torch.tensor(mapped[keep], dtype=torch.float32).reshape(-1, 4)


# --- transforms ----------------------------------------------------------------------------


def image_transform(augment: str, image_size: int) -> Callable:
    """PIL image → float ``3×size×size`` tensor in [0, 1]; ``"none"`` is the eval view."""
    from torchvision.transforms import v2

    resize = v2.Resize(resize_size(image_size))
    flip = v2.RandomHorizontalFlip()
    steps = {
        "none": [resize, v2.CenterCrop(image_size)],
        "flip": [resize, v2.CenterCrop(image_size), flip],
        "crop": [resize, v2.RandomCrop(image_size)],
        "crop-flip": [resize, v2.RandomCrop(image_size), flip],
        "resized-crop-flip": [v2.RandomResizedCrop(image_size), flip],
    }
    if augment not in steps:
        valid = ", ".join(a for a in AUGMENTS if a == "auto" or a in steps)
        raise UserError(f"unknown augmentation '{augment}'", f"use one of: {valid}")
    return v2.Compose([*steps[augment], v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


# --- reading files -------------------------------------------------------------------------


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format PIL can open."""
    from PIL import Image

    Image.init()
    return frozenset(
        ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
    )


def open_rgb(path: str):
    """The image at ``path`` as an RGB PIL image; an unreadable file is a :class:`UserError`."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path}: {exc}", "remove or replace the file") from exc


def image_size_of(path: str) -> tuple[int, int]:
    """``(width, height)`` read from the file header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}", "remove or replace the file") from exc


def read_voc_boxes(path: str) -> tuple[np.ndarray, tuple[int, int] | None]:
    """``(K×4 xyxy boxes, (width, height) the file declares or None)`` of a VOC XML file."""

    def bad(problem: str) -> UserError:
        return UserError(f"malformed box file {path}: {problem}", f"expected {VOC_FORMAT}")

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise bad(str(exc)) from exc
    try:
        boxes = [
            [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
            for box in root.iter("bndbox")
        ]
        width, height = root.findtext("size/width"), root.findtext("size/height")
        declared = (int(float(width)), int(float(height))) if width and height else None
    except (TypeError, ValueError) as exc:
        raise bad("a coordinate or size is missing or not a number") from exc
    return np.array(boxes, dtype=np.float64).reshape(-1, 4), declared


# --- the dataset ---------------------------------------------------------------------------


class ImageFileDataset(Dataset):
    """Images decoded from files on demand; items are ``(float 3×size×size in [0,1], label)``.

    ``samples`` is the list of ``(path, label)``; ``box_files[i]`` the VOC XML of sample ``i``
    or ``None``. :meth:`boxes` is in the coordinates of the eval view, whatever ``transform``
    this dataset serves.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        *,
        image_size: int,
        transform: Callable,
        box_files: list[str | None] | None = None,
    ) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.image_size = image_size
        self.transform = transform
        self.box_files = box_files if box_files is not None else [None] * len(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(open_rgb(path)), label

    def boxes(self, index: int) -> torch.Tensor:
        """The ``K×4`` float xyxy boxes of sample ``index`` in the eval view (``0×4`` if none)."""
        xml = self.box_files[index]
        if xml is None:
            return torch.zeros(0, 4)
        raw, declared = read_voc_boxes(xml)
        width, height = image_size_of(self.samples[index][0])
        if declared and declared != (width, height) and min(declared) > 0:
            raw = raw * np.array([width, height, width, height]) / np.array(declared * 2)
        return boxes_to_eval_view(raw, width, height, self.image_size)

    @property
    def has_boxes(self) -> bool:
        return any(f is not None for f in self.box_files)


# --- listing a split -----------------------------------------------------------------------


@dataclass(frozen=True)
class SplitListing:
    """The files of one split: ``(path, label)`` samples and the box XML of each (or None)."""

    samples: list[tuple[str, int]]
    box_files: list[str | None]


def class_folders(split_dir: Path) -> list[str]:
    """Names of the sub-folders of ``split_dir`` (one per class), sorted."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def index_xml(root: Path) -> dict[str, str]:
    """Stem → path of every ``.xml`` under ``root`` (one walk; empty if it does not exist)."""
    found: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".xml":
                found.setdefault(stem, os.path.join(dirpath, name))
    return found


def list_split(
    split_dir: Path, class_index: dict[str, int], xml_dirs: Iterable[Path] = ()
) -> SplitListing:
    """Walk each class folder once for images and the XMLs beside them; ``xml_dirs`` are walked
    once each for XMLs found by the image's stem."""
    extensions = image_extensions()
    by_stem: dict[str, str] = {}
    for root in xml_dirs:
        for stem, path in index_xml(root).items():
            by_stem.setdefault(stem, path)
    samples: list[tuple[str, int]] = []
    box_files: list[str | None] = []
    for name in class_folders(split_dir):
        label = class_index[name]
        for dirpath, dirnames, files in os.walk(split_dir / name):
            dirnames.sort()
            beside = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(".xml")}
            for file in sorted(files):
                stem, ext = os.path.splitext(file)
                if ext.lower() not in extensions:
                    continue
                samples.append((os.path.join(dirpath, file), label))
                xml = os.path.join(dirpath, beside[stem]) if stem in beside else by_stem.get(stem)
                box_files.append(xml)
    return SplitListing(samples, box_files)


# --- bundles -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileLayout:
    """A file data set found on disk: its split folders, classes and where box XMLs may be."""

    name: str
    split_dirs: dict[str, Path | None]  # "train"/"test" → folder (None: absent)
    classes: list[str]
    class_names: tuple[str, ...]
    xml_dirs: dict[str, list[Path]]  # split → extra folders to search for box XMLs
    missing: UserError  # raised when a split folder is absent
    holdout: float = 0.0  # > 0: train and test share one folder; hold out this part of each class
    holdout_note: str = ""  # printed once when the held-out split is made


def file_bundle(spec: str, layout: FileLayout, image_size: int | None) -> DataBundle:
    """The bundle of a file data set; each split is listed once, the test split right away."""
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if size < 8:
        raise UserError(
            f"image size {size} is too small", "use an image size of 8 or more, e.g. 224"
        )
    class_index = {name: i for i, name in enumerate(layout.classes)}

    @functools.cache
    def list_once(folder: Path, xml_dirs: tuple[Path, ...]) -> SplitListing:
        found = list_split(folder, class_index, xml_dirs)
        if not found.samples:
            raise UserError(f"no images in {folder}", layout.missing.fix)
        return found

    def listing(split: str) -> SplitListing:
        folder = layout.split_dirs[split]
        if folder is None:
            raise UserError(f"the {layout.name} data has no {split} folder", layout.missing.fix)
        xml_dirs = tuple(layout.xml_dirs.get(split, ()))
        if layout.holdout > 0:
            return held_out_once(folder, xml_dirs, split == "test")
        return list_once(folder, xml_dirs)

    @functools.cache
    def held_out_once(folder: Path, xml_dirs: tuple[Path, ...], test: bool) -> SplitListing:
        found = list_once(folder, xml_dirs)
        is_test = holdout_split(found.samples, folder, layout.holdout, HOLDOUT_SEED)
        if not any(is_test):
            raise UserError(f"{spec} has too few images to hold out a test split (no class has "
                            "2 images)", "add images, or give a val/ folder")
        if test:
            text = (f"{layout.holdout_note} ({sum(is_test)} test / "
                    f"{len(is_test) - sum(is_test)} train images)")
            note_once(text, text)
        keep = [i for i, t in enumerate(is_test) if t == test]
        return SplitListing([found.samples[i] for i in keep], [found.box_files[i] for i in keep])

    test_has_boxes = layout.split_dirs["test"] is not None and any(listing("test").box_files)
    info = DataInfo(
        spec=spec,
        name=layout.name,
        num_classes=len(layout.classes),
        class_names=layout.class_names,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=size,
        has_boxes=test_has_boxes,
        default_augment="resized-crop-flip",
    )

    def factory(split: str) -> Callable[[str], ImageFileDataset]:
        def make(augment: str) -> ImageFileDataset:
            found = listing(split)
            transform = image_transform(augment, size)
            return ImageFileDataset(
                found.samples, image_size=size, transform=transform, box_files=found.box_files
            )

        return make

    return DataBundle(info, {"train": factory("train"), "test": factory("test")})


HOLDOUT_FRACTION = 0.2  # the part of each class held out as the test split of a flat folder
HOLDOUT_SEED = 0  # fixed: the same files always give the same split


def holdout_split(
    samples: list[tuple[str, int]], root: Path, fraction: float, seed: int = HOLDOUT_SEED
) -> list[bool]:
    """Which samples form the held-out test split (``True``), per class.

    Each class keeps ``round(n · fraction)`` of its ``n`` images for testing (at least one, and
    at least one for training, when it has two or more). Images are ranked by a SHA-256 hash of
    ``seed`` and their path relative to ``root``, so the split depends only on the file names:
    not on the global RNG, the order of listing or where the folder lies; adding images moves
    few of the others.
    """

    def rank(path: str) -> bytes:
        rel = Path(os.path.relpath(path, root)).as_posix()
        return hashlib.sha256(f"{seed}:{rel}".encode()).digest()

    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    is_test = [False] * len(samples)
    for members in by_class.values():
        n = len(members)
        k = min(max(math.floor(n * fraction + 0.5), 1), n - 1) if n >= 2 else 0
        for i in sorted(members, key=lambda j: rank(samples[j][0]))[:k]:
            is_test[i] = True
    return is_test


def folder_test_split(path: str) -> str:
    """Which images a ``folder:PATH`` set tests on, in words (from the layout alone)."""
    root = Path(path).expanduser()
    percent = f"{100 * HOLDOUT_FRACTION:g} %"
    if (root / "train").is_dir():
        test = next((n for n in ("val", "test") if (root / n).is_dir()), None)
        if test is not None:
            return f"{test}/"
        return f"{percent} of each class of train/ held out (seed {HOLDOUT_SEED})"
    return f"{percent} of each class held out (seed {HOLDOUT_SEED})"


def _require_dir(root: Path, missing: UserError) -> None:
    if not root.is_dir():
        raise UserError(missing.what, missing.fix)


def _classes_of(split_dirs: Iterable[Path | None], missing: UserError) -> list[str]:
    """The sorted class folders of the present splits; none at all is an error, and so are
    splits with different classes (a class without training images, or a misspelt folder,
    would be trained and scored silently)."""
    found = {folder: set(class_folders(folder)) for folder in split_dirs if folder is not None}
    names = set().union(*found.values()) if found else set()
    if not names:
        raise UserError(missing.what, missing.fix)
    for folder, classes in found.items():
        absent = sorted(names - classes)
        if absent and classes:
            shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5
                                             else "")
            raise UserError(f"{folder} has no folder for the class(es) {shown} that the other "
                            "split has", "give every split the same class folders")
    return sorted(names)


def read_synset_names(path: Path) -> dict[str, str]:
    """wnid → first human name, from lines like ``n01440764 tench, Tinca tinca``."""
    names: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, description = line.strip().partition(" ")
            if wnid and description:
                names[wnid] = description.split(",")[0].strip()
    return names


def display_names(wnids: list[str], human: dict[str, str]) -> tuple[str, ...]:
    """Human names where known; a name shared by several classes gets its wnid appended."""
    names = [human.get(w, w) for w in wnids]
    return tuple(
        f"{n} ({w})" if names.count(n) > 1 and n != w else n
        for n, w in zip(names, wnids, strict=True)
    )


def load_imagenet_bundle(spec: str, path: str, *, image_size: int | None) -> DataBundle:
    """ImageNet in the ILSVRC layout ``PATH/train/<wnid>/*.JPEG`` and ``PATH/val/<wnid>/*.JPEG``.

    ``validation/`` is accepted for ``val/``; either split may be absent until it is used.
    Class names are human names when ``PATH/LOC_synset_mapping.txt`` exists, else wnids. Box
    XMLs are looked for beside each image, then by image stem under ``PATH/val_bounding_boxes/``,
    ``PATH/bbox/<split>/`` and ``PATH/Annotations/CLS-LOC/<split>/``.
    """
    root = Path(path).expanduser()
    missing = UserError(
        f"no ImageNet data at {root}",
        f"expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG "
        "(one folder per class, named by wnid, e.g. n01440764)",
    )
    _require_dir(root, missing)
    train = root / "train"
    val = next((root / n for n in ("val", "validation") if (root / n).is_dir()), None)
    split_dirs = {"train": train if train.is_dir() else None, "test": val}
    if val is not None and not class_folders(val) and any(val.iterdir()):
        raise UserError(
            f"the ImageNet validation images in {val} are not in class folders",
            f"move each image into {val}/<wnid>/ (e.g. with the devkit's ground truth)",
        )
    classes = _classes_of(split_dirs.values(), missing)

    def xml_dirs(split_names: tuple[str, ...]) -> list[Path]:
        return [root / sub / n for sub in ("bbox", "Annotations/CLS-LOC") for n in split_names]

    layout = FileLayout(
        name="imagenet",
        split_dirs=split_dirs,
        classes=classes,
        class_names=display_names(classes, read_synset_names(root / SYNSET_MAPPING)),
        xml_dirs={
            "train": xml_dirs(("train",)),
            "test": [root / "val_bounding_boxes", *xml_dirs(("val", "validation"))],
        },
        missing=missing,
    )
    return file_bundle(spec, layout, image_size)


def load_folder_bundle(spec: str, path: str, *, image_size: int | None) -> DataBundle:
    """Class-per-folder images (any format PIL opens), e.g. ``PATH/<class>/*.png``.

    If ``PATH/train/`` exists, it is the train split and ``PATH/val/`` (or ``PATH/test/``) the
    test split. Without a test folder (``PATH/train/`` alone, or ``PATH/<class>/`` with no
    split at all), a seeded, stratified :data:`HOLDOUT_FRACTION` of each class is held out as
    the test split (see :func:`holdout_split`; a note says so), so train and test never
    overlap. A VOC XML beside an image gives its boxes.
    """
    root = Path(path).expanduser()
    missing = UserError(
        f"no class folders of images at {root}",
        f"expected {root}/<class>/<image>, or {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image>",
    )
    _require_dir(root, missing)
    train = root / "train"
    percent = f"{100 * HOLDOUT_FRACTION:g} %"
    holdout, note = 0.0, ""
    if train.is_dir():
        test = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        if test is None:
            holdout = HOLDOUT_FRACTION
            note = (f"{spec} has train/ but no val/ or test/ split; holding out {percent} of "
                    f"each class of train/ (seed {HOLDOUT_SEED}) as the test split")
        split_dirs = {"train": train, "test": test or train}
    else:
        split_dirs = {"train": root, "test": root}
        holdout = HOLDOUT_FRACTION
        note = (f"{spec} has no val/ split; holding out {percent} of each class "
                f"(seed {HOLDOUT_SEED}) as the test split")
    classes = _classes_of(split_dirs.values(), missing)
    layout = FileLayout(
        name="folder",
        split_dirs=split_dirs,
        classes=classes,
        class_names=tuple(classes),
        xml_dirs={},
        missing=missing,
        holdout=holdout,
        holdout_note=note,
    )
    return file_bundle(spec, layout, image_size)
