"""Data specs: digits, shapes, CIFAR pickles, ImageNet and plain folders, and their errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from narrows.data import load
from narrows.errors import UserError


def train_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = images.float().div(255.0)
    return flat.mean(dim=(0, 2, 3)), flat.std(dim=(0, 2, 3))


# --- digits --------------------------------------------------------------------------------


def test_digits_split_is_fixed_and_stratified():
    first, second = load("digits"), load("digits")
    train, test = first.train("none"), first.test()
    assert (len(train), len(test)) == (1257, 540)
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    assert sorted(set(test.targets)) == list(range(10))
    assert torch.equal(train.images, second.train("none").images)
    assert torch.equal(test.labels, second.test().labels)
    mean, std = train_stats(train.images)
    assert torch.allclose(torch.tensor(first.info.mean), mean, atol=1e-5)
    assert torch.allclose(torch.tensor(first.info.std), std, atol=1e-5)
    image, label = test[0]
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert isinstance(label, int)


def test_unknown_spec_is_a_user_error():
    with pytest.raises(UserError, match="unknown data spec"):
        load("mnist")


# --- shapes --------------------------------------------------------------------------------

SMALL = "shapes:size=32,train=40,test=12"


def test_shapes_counts_and_info():
    bundle = load(SMALL)
    train, test = bundle.train("none"), bundle.test()
    assert (len(train), len(test)) == (40, 12)
    assert train.images.shape == (40, 3, 32, 32) and train.masks.shape == (40, 32, 32)
    info = bundle.info
    assert info.has_boxes and info.has_masks and info.default_augment == "crop-flip"
    assert info.class_names == ("circle", "square", "triangle", "plus")
    assert info.num_classes == 4 and info.image_size == 32
    mean, std = train_stats(train.images)
    assert torch.allclose(torch.tensor(info.mean), mean, atol=1e-5)
    assert torch.allclose(torch.tensor(info.std), std, atol=1e-5)
    assert torch.bincount(train.labels).tolist() == [10] * 4
    assert torch.bincount(test.labels).tolist() == [3] * 4
    image, _ = bundle.train()[0]  # with the default augmentation
    assert image.shape == (3, 32, 32)


def test_shapes_are_reproducible_per_seed_and_index():
    a, b = load(SMALL).train("none"), load(SMALL).train("none")
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    other = load(SMALL + ",seed=1").train("none")
    assert not torch.equal(a.images, other.images)
    prefix = load("shapes:size=32,train=8,test=4").train("none")
    assert torch.equal(prefix.images, a.images[:8])  # image i does not depend on the count
    assert not torch.equal(load(SMALL).test().images, a.images[:12])  # splits differ


def test_shape_boxes_are_the_tight_boxes_of_the_masks():
    bundle = load("shapes:classes=8,size=32,train=24,test=8")
    for split in (bundle.train("none"), bundle.test()):
        assert split.has_boxes
        boxes = [split.boxes(i) for i in range(len(split))]
        for box, mask in zip(boxes, split.masks, strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(xs) > 0
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert box.shape == (1, 4) and box.dtype == torch.float32
            assert box[0].tolist() == [float(v) for v in expected]


def test_shape_size_follows_rmin_rmax_and_defaults_are_unchanged():
    default = load(SMALL).train("none")
    explicit = load(SMALL + ",rmin=22,rmax=42").train("none")
    assert torch.equal(default.images, explicit.images)
    small = load("shapes:size=64,train=40,test=4,rmin=10,rmax=15").train("none")
    for mask in small.masks:  # circumradius ≤ 15 % of 64 px: the shape fits a 20 px square
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert int(xs.max() - xs.min()) + 1 <= 20 and int(ys.max() - ys.min()) + 1 <= 20
    assert small.masks.float().mean() < 0.5 * default.masks.float().mean()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("colour=3", "unknown shapes option 'colour'"),
        ("classes=9", "out of range"),
        ("classes=1", "out of range"),
        ("size=big", "not an integer"),
        ("train", "needs a value"),
        ("train=2", "at least one image per class"),
        ("rmin=30,rmax=20", "above rmax"),
        ("rmax=60", "out of range"),
    ],
)
def test_bad_shapes_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message) as caught:
        load("shapes:" + options)
    assert caught.value.fix  # says how to write it


def test_unknown_shapes_option_lists_the_valid_keys():
    with pytest.raises(UserError) as caught:
        load("shapes:classes=4,colour=3")
    assert "classes, size, train, test, seed" in caught.value.fix


# --- CIFAR ---------------------------------------------------------------------------------


def known_image() -> np.ndarray:
    """A 3×32×32 image whose channels tell rows, columns and colours apart."""
    y, x = np.mgrid[0:32, 0:32]
    return np.stack([x * 8, y * 8, np.full_like(x, 7)]).astype(np.uint8)


def write_pickle(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(content, f)


def fake_batch(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, list[int]]:
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[0] = known_image()
    return images, rng.integers(0, classes, size=n).tolist()


def write_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official layout with tiny batches; returns (train images, train labels, test images)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    train_images, train_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = fake_batch(rng, per_batch, 10)
        write_pickle(
            folder / name,
            {b"batch_label": b"x", b"labels": labels, b"data": images.reshape(per_batch, -1)},
        )
        if name != "test_batch":
            train_images.append(images)
            train_labels += labels
    names = [f"class{i}".encode() for i in range(10)]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(train_images), np.array(train_labels), images


def test_cifar10_round_trips_pixels_and_labels(tmp_path):
    train_images, train_labels, test_images = write_cifar10(tmp_path)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        bundle = load(f"cifar10:{path}")
        train = bundle.train("none")
        assert train.images.shape == (20, 3, 32, 32)
        assert np.array_equal(train.images.numpy(), train_images)
        assert train.targets == train_labels.tolist()
        assert np.array_equal(bundle.test().images.numpy(), test_images)
    assert np.array_equal(train.images[0].numpy(), known_image())
    image, label = train[0]
    assert image[0, 3, 5] == pytest.approx(5 * 8 / 255) and image[1, 3, 5] == pytest.approx(
        24 / 255
    )
    assert label == train_labels[0]
    info = bundle.info
    assert info.num_classes == 10 and info.class_names[3] == "class3"
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.default_augment == "crop-flip"


def test_cifar100_round_trips_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    written = {}
    for name in ("train", "test"):
        images, labels = fake_batch(rng, 6, 100)
        written[name] = (images, labels)
        write_pickle(
            folder / name,
            {
                b"data": images.reshape(6, -1),
                b"fine_labels": labels,
                b"coarse_labels": [0] * 6,
            },
        )
    names = [f"fine{i}".encode() for i in range(100)]
    write_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": []})
    bundle = load(f"cifar100:{tmp_path}")
    for split, name in ((bundle.train("none"), "train"), (bundle.test(), "test")):
        assert np.array_equal(split.images.numpy(), written[name][0])
        assert split.targets == written[name][1]
    assert bundle.info.num_classes == 100 and bundle.info.class_names[42] == "fine42"


def test_missing_cifar_names_the_layout(tmp_path):
    with pytest.raises(UserError) as caught:
        load(f"cifar10:{tmp_path}")
    text = str(caught.value)
    assert "no CIFAR-10 data" in text
    assert "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}" in text
    assert "--download" in text
    with pytest.raises(UserError, match=r"cifar-100-python/\{train,test,meta\}"):
        load(f"cifar100:{tmp_path}")


def test_incomplete_or_malformed_cifar_is_a_user_error(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing data_batch_3"):
        load(f"cifar10:{tmp_path}")
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    bundle = load(f"cifar10:{tmp_path}")  # splits are read on first use
    with pytest.raises(UserError, match="malformed CIFAR-10 file .*data_batch_3"):
        bundle.train("none")
    write_pickle(folder / "data_batch_3", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(UserError, match="no b'labels' entry"):
        load(f"cifar10:{tmp_path}").train("none")
    write_pickle(
        folder / "data_batch_3", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    )
    with pytest.raises(UserError, match="N×3072"):
        load(f"cifar10:{tmp_path}").train("none")
    write_pickle(folder / "test_batch", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]})
    with pytest.raises(UserError, match="labels outside"):
        load(f"cifar10:{tmp_path}").test()


def test_cifar_download_failure_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download CIFAR-10"):
        load(f"cifar10:{tmp_path / 'new'}", download=True)


# --- ImageNet ------------------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], box: tuple[int, int, int, int] | None = None):
    """A black ``width×height`` image with a white box covering pixels [x0, x1) × [y0, y1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    if box is not None:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(image).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 255, 255))
    image.save(path)


def write_voc(path: Path, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = "".join(
        f"<object><name>n0</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
        f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for a, b, c, d in boxes
    )
    path.write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


@pytest.fixture
def imagenet(tmp_path) -> Path:
    """Two classes; val boxes beside an image, in val_bounding_boxes/ and in Annotations/."""
    root = tmp_path / "imagenet"
    write_image(root / "train/n0001/t1.JPEG", (40, 30))
    write_image(root / "train/n0002/t2.png", (30, 40))
    write_image(root / "train/n0002/t3.JPEG", (50, 50))
    write_image(root / "val/n0001/v1.png", (80, 60), (10, 5, 50, 40))
    write_voc(root / "val/n0001/v1.xml", (80, 60), [(10, 5, 50, 40)])
    write_image(root / "val/n0001/v4.png", (40, 40))  # no box
    write_image(root / "val/n0002/v2.png", (60, 90))
    # declares twice the real size: boxes are rescaled; the second one is cropped away
    write_voc(root / "val_bounding_boxes/v2.xml", (120, 180), [(40, 60, 80, 120), (0, 0, 20, 20)])
    write_image(root / "val/n0002/v3.png", (66, 50), (11, 10, 55, 45))
    write_voc(root / "Annotations/CLS-LOC/val/deep/v3.xml", (66, 50), [(11, 10, 55, 45)])
    (root / "LOC_synset_mapping.txt").write_text("n0001 goldfish, Carassius\nn0002 tench, Tinca\n")
    return root


def boxes_by_name(dataset) -> dict[str, list[list[float]]]:
    return {Path(p).stem: dataset.boxes(i).tolist() for i, (p, _) in enumerate(dataset.samples)}


def test_imagenet_lists_classes_and_boxes(imagenet):
    bundle = load(f"imagenet:{imagenet}", image_size=32)
    info = bundle.info
    assert info.class_names == ("goldfish", "tench") and info.num_classes == 2
    assert info.has_boxes and info.image_size == 32 and info.mean == (0.485, 0.456, 0.406)
    test = bundle.test()
    assert [Path(p).name for p, _ in test.samples] == ["v1.png", "v4.png", "v2.png", "v3.png"]
    assert test.targets == [0, 0, 1, 1]
    # eval view: shorter side to int(32*256/224) = 36, then a centred 32×32 crop
    # v1 80×60 → 48×36, scale 0.6, crop at (8, 2): (10,5,50,40) → (-2,1,22,22) → clipped
    # v2 60×90 → 36×54, scale 0.6, crop at (2, 11); XML coordinates halved first
    # v3 66×50 → 47×36, crop at (round(7.5)=8, 2)
    expected = {
        "v1": [[0.0, 1.0, 22.0, 22.0]],
        "v4": [],
        "v2": [[20 * 0.6 - 2, 30 * 0.6 - 11, 40 * 0.6 - 2, 60 * 0.6 - 11]],
        "v3": [[0.0, 10 * 0.72 - 2, 55 * 47 / 66 - 8, 45 * 0.72 - 2]],
    }
    got = boxes_by_name(test)
    for name, boxes in expected.items():
        assert np.allclose(got[name], boxes, atol=1e-4) if boxes else got[name] == [], name
    assert test.boxes(1).shape == (0, 4)
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0


@pytest.mark.parametrize("index", [0, 3])
def test_imagenet_boxes_match_the_served_pixels(imagenet, index):
    test = load(f"imagenet:{imagenet}", image_size=32).test()
    image, _ = test[index]
    ys, xs = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    drawn = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    assert torch.allclose(drawn, test.boxes(index)[0], atol=1.0)


def test_imagenet_train_split_and_augmentations(imagenet):
    bundle = load(f"imagenet:{imagenet}", image_size=24)
    train = bundle.train()
    assert len(train) == 3 and train.targets == [0, 1, 1]
    for augment in ("resized-crop-flip", "crop", "flip", "crop-flip", "none"):
        image, _ = bundle.split("train", augment)[2]
        assert image.shape == (3, 24, 24)
    with pytest.raises(UserError, match="unknown augmentation"):
        bundle.split("train", "rotate")


def test_imagenet_default_size_and_validation_alias(imagenet):
    (imagenet / "val").rename(imagenet / "validation")
    bundle = load(f"imagenet:{imagenet}")
    assert bundle.info.image_size == 224 and len(bundle.test()) == 4
    image, _ = bundle.test()[0]
    assert image.shape == (3, 224, 224)


def test_missing_imagenet_names_the_layout(tmp_path):
    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(UserError) as caught:
            load(f"imagenet:{path}")
        assert "train/<class>/*.JPEG" in str(caught.value)
        assert "val/<class>/*.JPEG" in str(caught.value)


def test_imagenet_flat_val_and_missing_train_are_user_errors(tmp_path):
    write_image(tmp_path / "val/ILSVRC2012_val_00000001.JPEG", (20, 20))
    with pytest.raises(UserError, match="not in class folders"):
        load(f"imagenet:{tmp_path}")
    (tmp_path / "val/ILSVRC2012_val_00000001.JPEG").unlink()
    write_image(tmp_path / "val/n0001/a.JPEG", (20, 20))
    bundle = load(f"imagenet:{tmp_path}")  # evaluation needs no train folder
    assert len(bundle.test()) == 1 and not bundle.info.has_boxes
    with pytest.raises(UserError, match="train/<class>/"):
        bundle.train()


def test_malformed_box_file_is_a_user_error(imagenet):
    (imagenet / "val/n0001/v1.xml").write_text("<annotation><object><bndbox><xmin>3</xmin>")
    test = load(f"imagenet:{imagenet}", image_size=32).test()
    with pytest.raises(UserError, match="PASCAL VOC"):
        test.boxes(0)


def test_unreadable_image_is_a_user_error(imagenet):
    (imagenet / "val/n0001/v4.png").write_bytes(b"not an image")
    test = load(f"imagenet:{imagenet}", image_size=32).test()
    with pytest.raises(UserError, match="cannot read image"):
        test[1]


# --- folder --------------------------------------------------------------------------------


def write_classes(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{i}.png", (20 + i, 16))


def test_folder_without_splits_holds_out_a_test_split(tmp_path):
    write_classes(tmp_path, {"cat": 2, "dog": 3})
    (tmp_path / "notes.txt").write_text("ignored")
    bundle = load(f"folder:{tmp_path}", image_size=16)
    assert bundle.info.class_names == ("cat", "dog") and bundle.info.name == "folder"
    assert not set(bundle.train("none").samples) & set(bundle.test().samples)
    assert bundle.test().targets == [0, 1]  # one image of each class held out
    assert bundle.train("none").targets == [0, 1, 1]
    assert not bundle.info.has_boxes
    image, _ = bundle.train()[2]
    assert image.shape == (3, 16, 16)


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_folder_with_train_and_val(tmp_path, test_name):
    write_classes(tmp_path / "train", {"a": 2, "b": 2, "c": 1})
    write_classes(tmp_path / test_name, {"a": 1, "b": 1, "c": 1})
    bundle = load(f"folder:{tmp_path}", image_size=16)
    assert bundle.info.class_names == ("a", "b", "c")
    assert len(bundle.train("none")) == 5 and bundle.test().targets == [0, 1, 2]


@pytest.mark.parametrize("test_name", ["val", "test"])
def test_folder_whose_splits_have_different_classes_is_refused(tmp_path, test_name):
    """A class only in val (a misspelt folder, or one never trained on) was scored silently."""
    write_classes(tmp_path / "train", {"a": 2, "b": 2})
    write_classes(tmp_path / test_name, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(UserError, match="no folder for the class.* c that the other split"):
        load(f"folder:{tmp_path}", image_size=16)


def test_empty_or_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="<class>/<image>"):
        load(f"folder:{tmp_path / 'absent'}")
    with pytest.raises(UserError, match="<class>/<image>"):
        load(f"folder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UserError, match="no images in"):
        load(f"folder:{tmp_path}")
