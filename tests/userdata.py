"""Small data sets laid out as a user brings them: class folders with and without a split, an
ILSVRC tree with box XMLs, the official CIFAR-10 pickles. Each image is a filled square of its
class's colour on a noisy background, so a model can learn the classes in a few steps.

Usable from tests (``make_*(tmp_path)``) and from the shell:
``python tests/userdata.py DIR`` writes all four under ``DIR``.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40))
CLASS_NAMES = ("circle", "square", "triangle", "star")
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")


def _image(rng: np.random.Generator, label: int, size: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """An ``size×size×3`` uint8 image and the xyxy box of its square."""
    image = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    side = int(rng.integers(size // 3, size // 2 + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    image[y0:y0 + side, x0:x0 + side] = COLOURS[label % len(COLOURS)]
    return image, (x0, y0, x0 + side, y0 + side)


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _write_voc(path: Path, box: tuple[int, ...], size: int, name: str) -> None:
    x0, y0, x1, y1 = box
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{size}</width><height>{size}</height><depth>3</depth></size>"
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>"
    )


def _class_folders(root: Path, names: tuple[str, ...], per_class: int, size: int, seed: int,
                   ext: str = ".png", boxes: bool = False) -> None:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(names):
        for i in range(per_class):
            image, box = _image(rng, label, size)
            stem = f"{name}_{i:04d}"
            _write_png(root / name / f"{stem}{ext}", image)
            if boxes:
                _write_voc(root / name / f"{stem}.xml", box, size, name)


def make_folder_split(root: Path, *, classes: int = 3, per_class: int = 6, size: int = 40,
                      boxes: bool = False) -> str:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``; returns the data spec."""
    names = CLASS_NAMES[:classes]
    _class_folders(root / "train", names, per_class, size, seed=1, boxes=boxes)
    _class_folders(root / "val", names, max(2, per_class // 2), size, seed=2, boxes=boxes)
    return f"folder:{root}"


def make_flat_folder(root: Path, *, classes: int = 3, per_class: int = 8, size: int = 40) -> str:
    """``root/<class>/*.png`` with no split; returns the data spec."""
    _class_folders(root, CLASS_NAMES[:classes], per_class, size, seed=3)
    return f"folder:{root}"


def make_imagenet_tree(root: Path, *, classes: int = 3, per_class: int = 6, size: int = 48) -> str:
    """``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG`` with a VOC XML beside each
    validation image, and ``LOC_synset_mapping.txt``; returns the data spec."""
    wnids = WNIDS[:classes]
    _class_folders(root / "train", wnids, per_class, size, seed=4, ext=".JPEG")
    _class_folders(root / "val", wnids, max(2, per_class // 2), size, seed=5, ext=".JPEG",
                   boxes=True)
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {n}, a {n}\n" for w, n in zip(wnids, CLASS_NAMES, strict=False)))
    return f"imagenet:{root}"


def make_cifar10_tree(root: Path, *, per_batch: int = 8, test: int = 20) -> str:
    """``root/cifar-10-batches-py`` with five tiny training batches, a test batch and the meta
    file, as the official pickles are written; returns the data spec."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(6)

    def batch(n: int) -> dict:
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        data = np.stack([_image(rng, lab, 32)[0].transpose(2, 0, 1).reshape(-1) for lab in labels])
        return {b"data": data.astype(np.uint8), b"labels": labels}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch)))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test)))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return f"cifar10:{root}"


if __name__ == "__main__":
    if any(arg.startswith("-") for arg in sys.argv[1:]):
        print("usage: python tests/userdata.py [DIR]   (writes split/, flat/, imagenet/ and "
              "cifar/ under DIR, default ./userdata)")
        raise SystemExit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "userdata")
    for name, make in (("split", make_folder_split), ("flat", make_flat_folder),
                       ("imagenet", make_imagenet_tree), ("cifar", make_cifar10_tree)):
        print(make(out / name))
