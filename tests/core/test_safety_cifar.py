"""CIFAR pickles are read without running code, and batches that lie about their lengths are refused."""

from __future__ import annotations

import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from narrows.cli import main
from narrows.data import load
from narrows.data.cifar import LAYOUTS, read_batch
from narrows.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: userdata.py
from userdata import make_cifar10_tree  # noqa: E402

LAYOUT = LAYOUTS["cifar10"]


class Payload:
    """Unpickling this would create ``marker``: what a hostile CIFAR file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint, tmp_path_factory) -> str:
    """A random-init CIFAR-10 checkpoint, made from a clean tree."""
    return random_checkpoint(make_cifar10_tree(tmp_path_factory.mktemp("clean"), per_batch=1, test=1))


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["batches.meta", "data_batch_1", "test_batch"])
def test_hostile_pickle_does_not_run(tmp_path, capsys, checkpoint, name):
    spec = make_cifar10_tree(tmp_path / "data", per_batch=2, test=2)
    target = tmp_path / "data" / "cifar-10-batches-py" / name
    marker = tmp_path / "pwned"
    target.write_bytes(pickle.dumps({b"data": Payload(marker), b"label_names": Payload(marker)}))
    command = ["train", "--data", spec, "--model", "resnet20_cifar", "--epochs", "1",
               "--out", str(tmp_path / "run")]
    if name == "test_batch":
        command = ["evaluate", "--checkpoint", checkpoint, "--data", spec]
    capsys.readouterr()
    assert main(command) == 2
    assert not marker.exists()  # the payload never ran
    lines = error_lines(capsys)
    assert len(lines) == 1 and str(target) in lines[0], lines
    assert "refused to read" in lines[0] and "posix.mkdir" in lines[0]


def test_hostile_pickle_in_library_call(tmp_path):
    spec = make_cifar10_tree(tmp_path / "data", per_batch=2, test=2)
    meta = tmp_path / "data" / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps(Payload(tmp_path / "pwned"), protocol=0))
    with pytest.raises(UserError, match="refused to read"):
        load(spec)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_userdata_tree_still_loads(tmp_path, protocol):
    spec = make_cifar10_tree(tmp_path, per_batch=3, test=4)
    folder = tmp_path / "cifar-10-batches-py"
    for name in ("data_batch_1", "test_batch", "batches.meta"):  # re-pickle at each protocol
        (folder / name).write_bytes(pickle.dumps(pickle.loads((folder / name).read_bytes()),
                                                 protocol=protocol))
    bundle = load(spec)
    assert bundle.info.class_names[0] == "airplane"
    assert len(bundle.train("none")) == 15 and len(bundle.test()) == 4


def python2_batch(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the official files are written: Python 2 numpy, protocol 2, ``str`` data."""

    def string(value: bytes) -> bytes:  # a Python 2 ``str``
        return b"U" + bytes([len(value)]) + value if len(value) < 256 else (
            b"T" + struct.pack("<i", len(value)) + value)

    def small(value: int) -> bytes:
        return b"K" + bytes([value]) if value < 256 else b"M" + struct.pack("<H", value)

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + small(0) + small(1) + b"\x87R"
             + b"(" + small(3) + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
             + small(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + small(0) + b"\x85"
             + string(b"b") + b"\x87R" + b"(" + small(1) + small(images.shape[0])
             + small(images.shape[1]) + b"\x86" + dtype + b"\x89" + string(images.tobytes())
             + b"tb")
    label_list = b"]" + b"(" + b"".join(small(v) for v in labels) + b"e"
    names = b"]" + b"(" + b"".join(string(f"img_{i}.png".encode()) for i in labels) + b"e"
    return (b"\x80\x02}(" + string(b"batch_label") + string(b"testing batch 1 of 1")
            + string(b"data") + array + string(b"labels") + label_list
            + string(b"filenames") + names + b"u.")


def test_official_python2_layout_loads(tmp_path):
    images = np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)
    path = tmp_path / "test_batch"
    path.write_bytes(python2_batch(images, [4, 0, 9]))
    loaded, labels = read_batch(path, LAYOUT)
    assert labels.tolist() == [4, 0, 9]
    assert np.array_equal(loaded.reshape(3, -1), images)


@pytest.mark.parametrize(("content", "problem"), [
    ({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 20}, "one integer per image"),
    ({b"data": np.zeros((20, 3000), np.uint8), b"labels": [0] * 20}, "shape N×3072"),
    ({b"data": [[0] * 3072] * 3 + [[0] * 10], b"labels": [0] * 4}, "unequal length"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"filenames": [b"a"]},
     "one name per image"),
])
def test_batch_with_wrong_lengths_is_refused(tmp_path, capsys, checkpoint, content, problem):
    spec = make_cifar10_tree(tmp_path / "data", per_batch=2, test=2)
    target = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    target.write_bytes(pickle.dumps(content))
    with pytest.raises(UserError, match=problem) as caught:
        read_batch(target, LAYOUT)
    assert str(target) in str(caught.value)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", spec]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and str(target) in lines[0] and problem in lines[0], lines
