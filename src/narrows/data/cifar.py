"""CIFAR-10 and CIFAR-100 from the official "python version" pickle files.

The files are pickles. They are read with :class:`BatchUnpickler`, which builds only what the
official files contain (dicts, lists, bytes, str, ints and numpy arrays) and refuses every other
global, so a hostile file cannot run code (see docs/safety.md). Nothing is downloaded unless
``download=True``.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from narrows.data.augment import tensor_augmentation
from narrows.data.base import DataBundle, DataInfo, TensorImageDataset
from narrows.errors import UserError

IMAGE_SIZE = 32
PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its files and what its pickles are keyed by."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    url: str
    md5: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    files_pattern: str  # how the error messages write the file list

    @property
    def all_files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def expected(self, root: Path) -> str:
        return f"expected {root}/{self.folder}/{self.files_pattern} (the official python version)"


LAYOUTS = {
    "cifar10": CifarLayout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        files_pattern="{data_batch_1..5,test_batch,batches.meta}",
    ),
    "cifar100": CifarLayout(
        title="CIFAR-100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        files_pattern="{train,test,meta}",
    ),
}


# --- finding and fetching the files --------------------------------------------------------


def find_data_dir(root: Path, layout: CifarLayout) -> Path | None:
    """``root/<folder>`` or ``root`` itself, whichever holds every file; ``None`` if neither."""
    for candidate in (root / layout.folder, root):
        if all((candidate / name).is_file() for name in layout.all_files):
            return candidate
    return None


def _missing_error(root: Path, layout: CifarLayout) -> UserError:
    for candidate in (root / layout.folder, root):
        present = [name for name in layout.all_files if (candidate / name).is_file()]
        if present:  # a partial copy: say which files are missing
            missing = [name for name in layout.all_files if name not in present]
            return UserError(
                f"incomplete {layout.title} data at {candidate}: missing {', '.join(missing)}",
                layout.expected(root) + "; pass --download to fetch it again",
            )
    return UserError(
        f"no {layout.title} data at {root}", layout.expected(root) + "; pass --download to fetch it"
    )


def fetch_archive(root: Path, layout: CifarLayout) -> None:
    """Fetch and extract the official archive into ``root``; any failure is a :class:`UserError`."""
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(layout.url, download_root=str(root), md5=layout.md5)
    except Exception as exc:  # network, disk and checksum errors all mean the same to the user
        raise UserError(
            f"could not download {layout.title} from {layout.url}: {exc}",
            f"check the network, or download and extract the archive into {root} by hand",
        ) from exc


# --- reading the pickles -------------------------------------------------------------------


def _malformed(path: Path, layout: CifarLayout, problem: str) -> UserError:
    return UserError(
        f"malformed {layout.title} file {path}: {problem}",
        f"expected {path.parent}/{layout.files_pattern} as in the official python version "
        f"({layout.url}); replace the damaged file with the one from that archive",
    )


def _numpy_global(modules: tuple[str, ...], name: str) -> object:
    """``name`` from the first of ``modules`` that has it (numpy 2 moved ``core`` to ``_core``)."""
    import importlib

    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {' or '.join(modules)}")


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
# the globals an official CIFAR pickle (Python 2 numpy, protocol 2) or a re-pickled copy
# (Python 3 numpy, any protocol) refers to, and where each really lives in this numpy
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], object]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    **{
        (m, "_reconstruct"): (lambda: _numpy_global(_MULTIARRAY, "_reconstruct"))
        for m in _MULTIARRAY
    },
    **{(m, "scalar"): (lambda: _numpy_global(_MULTIARRAY, "scalar")) for m in _MULTIARRAY},
    **{(m, "_frombuffer"): (lambda: _numpy_global(_NUMERIC, "_frombuffer")) for m in _NUMERIC},
    # bytes pickled by Python 3 at protocol < 3 are rebuilt by codecs.encode(text, "latin1")
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR file never contains."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch and meta files, refusing any global outside :data:`_ALLOWED_GLOBALS`.

    Builtin containers and scalars (dict, list, tuple, bytes, str, int, float) need no global,
    so they load as usual; everything else (``os.system``, ``builtins.eval``, any class with a
    ``__reduce__``) is refused before it is looked up, so no code from the file runs.
    """

    def find_class(self, module: str, name: str) -> object:
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise RefusedGlobal(f"{module}.{name}")
        return make()


def _unpickle(path: Path, layout: CifarLayout) -> dict:
    try:
        with open(path, "rb") as f:
            content = BatchUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as exc:
        raise UserError(
            f"refused to read {layout.title} file {path}: it asks to run or build {exc}, "
            "which no CIFAR file contains (it may be hostile)",
            f"replace it with the file from the official archive ({layout.url})",
        ) from exc
    except Exception as exc:  # unpickling can fail in many ways on a damaged file
        raise _malformed(path, layout, f"not a readable pickle ({type(exc).__name__})") from exc
    if not isinstance(content, dict):
        raise _malformed(path, layout, "the pickle is not a dictionary")
    return content


def _field(content: dict, key: bytes, path: Path, layout: CifarLayout):
    if key not in content:
        raise _malformed(path, layout, f"no {key!r} entry")
    return content[key]


def read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as ``(uint8 N×3×32×32 images, int64 N labels)``."""
    content = _unpickle(path, layout)
    try:
        data = np.asarray(_field(content, b"data", path, layout))
        labels = np.asarray(_field(content, layout.label_key, path, layout))
    except (ValueError, TypeError) as exc:  # ragged lists: rows or labels of unequal lengths
        raise _malformed(path, layout, f"rows of unequal length ({type(exc).__name__})") from exc
    if data.ndim != 2 or data.shape[1] != PIXELS or not np.issubdtype(data.dtype, np.integer):
        raise _malformed(path, layout, f"b'data' should be integers of shape N×{PIXELS}")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise _malformed(path, layout, "pixel values outside 0..255")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise _malformed(path, layout, f"{layout.label_key!r} should hold one integer per image")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise _malformed(path, layout, f"labels outside 0..{layout.num_classes - 1}")
    filenames = content.get(b"filenames")  # in the official files; optional in a copy
    if filenames is not None and (
        not isinstance(filenames, list | tuple) or len(filenames) != data.shape[0]
    ):
        raise _malformed(
            path, layout, f"b'filenames' should list one name per image ({data.shape[0]})"
        )
    # each row is the red plane, then green, then blue, each row-major 32×32
    images = data.astype(np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return images, labels.astype(np.int64)


OFFICIAL_IMAGES = {"train": 50_000, "test": 10_000}  # both CIFAR-10 and CIFAR-100


def read_split(data_dir: Path, files: tuple[str, ...], layout: CifarLayout) -> TensorImageDataset:
    """The batches of one split, concatenated in file order; a count other than the official
    one (a partial or altered copy) is said once, in a ``warning:`` line."""
    from narrows.notes import note_once

    parts = [read_batch(data_dir / name, layout) for name in files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    split = "test" if files == layout.test_files else "train"
    if len(images) != OFFICIAL_IMAGES[split]:
        note_once(f"cifar-count-{data_dir}-{split}",
                  f"{data_dir} holds {len(images):,} {split} images, not the official "
                  f"{OFFICIAL_IMAGES[split]:,} of {layout.title}: a partial or altered copy "
                  f"({', '.join(files)})", prefix="warning")
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels))


def read_class_names(data_dir: Path, layout: CifarLayout) -> tuple[str, ...]:
    path = data_dir / layout.meta_file
    names = _field(_unpickle(path, layout), layout.names_key, path, layout)
    if not isinstance(names, list | tuple) or len(names) != layout.num_classes:
        raise _malformed(
            path, layout, f"{layout.names_key!r} should list {layout.num_classes} names"
        )
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


# --- the bundle ----------------------------------------------------------------------------


def load_cifar_bundle(spec: str, kind: str, path: str, *, download: bool) -> DataBundle:
    """CIFAR-10 (``kind="cifar10"``) or CIFAR-100 from ``path``; each split is read on first use.

    ``path`` is the folder that contains ``cifar-10-batches-py`` (``cifar-100-python``) or that
    folder itself. With ``download=True`` a missing copy is fetched into ``path``.
    """
    layout = LAYOUTS[kind]
    root = Path(path).expanduser()
    data_dir = find_data_dir(root, layout)
    if data_dir is None and download:
        fetch_archive(root, layout)
        data_dir = find_data_dir(root, layout)
    if data_dir is None:
        raise _missing_error(root, layout)
    info = DataInfo(
        spec=spec,
        name=kind,
        num_classes=layout.num_classes,
        class_names=read_class_names(data_dir, layout),
        mean=layout.mean,
        std=layout.std,
        image_size=IMAGE_SIZE,
        default_augment="crop-flip",
    )

    def factory(files: tuple[str, ...]) -> Callable[[str], TensorImageDataset]:
        base = functools.cache(lambda: read_split(data_dir, files, layout))
        return lambda augment: base().with_transform(tensor_augmentation(augment, IMAGE_SIZE))

    return DataBundle(
        info, {"train": factory(layout.train_files), "test": factory(layout.test_files)}
    )
