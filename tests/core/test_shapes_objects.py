"""The shapes data set with ``objects=N``: several shapes per image, their boxes, masks and targets."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch.utils.data import Subset

from narrows.data import load
from narrows.data.base import dataset_boxes, dataset_labels
from narrows.errors import UserError

SCENES = "shapes:objects=3,classes=4,size=32,train=16,test=6"

# sha256 of (images, labels, masks, boxes) of both splits, taken from the single-shape
# implementation before ``objects`` existed: objects=1 must keep every byte
BEFORE_OBJECTS = {
    "shapes:classes=8,size=32,train=16,test=8": (
        "e0513f7a3ae5d52637b1ac20a16075f32f06f3010920f76d7998eba2aa1a8b20",
        "48d81b22758c73c17adb6a826246aac07c92b15d4e41bc6f7fc14360b52a3fc3",
    ),
    "shapes:classes=4,size=48,train=8,test=4,seed=7,rmin=10,rmax=20": (
        "77cd895bd967991d87a5e569ac4ee31368ad7d06060ba3f515d8c879666b2bca",
        "6e2b6a14a8d8e5408a1ea370785141dc0b11a10d04c62ddda2cab617fc6d368c",
    ),
}


def digest(split) -> str:
    h = hashlib.sha256()
    boxes = torch.cat([split.boxes(i) for i in range(len(split))])
    for tensor in (split.images, split.labels, split.masks, boxes):
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("spec", sorted(BEFORE_OBJECTS))
def test_one_object_is_bit_identical_to_the_single_shape_set(spec):
    for options in (spec, spec + ",objects=1"):
        bundle = load(options)
        train, test = bundle.train("none"), bundle.test()
        assert (digest(train), digest(test)) == BEFORE_OBJECTS[spec]
        # the new targets of a one-object image: its label, everywhere its mask is
        assert torch.equal(train.class_masks, train.masks.long() * (train.labels + 1)[:, None, None])
        assert torch.equal(train.instance_masks.bool(), train.masks)
        onehot = torch.nn.functional.one_hot(train.labels, bundle.info.num_classes).bool()
        assert torch.equal(train.multilabel_targets, onehot)
        assert all(train.object_classes(i).tolist() == [train.labels[i]] for i in range(len(train)))


def test_scene_objects_masks_boxes_and_targets_agree():
    bundle = load(SCENES)
    for split in (bundle.train("none"), bundle.test()):
        counts = []
        for i in range(len(split)):
            classes, masks, boxes = split.object_classes(i), split.object_masks(i), split.boxes(i)
            k = len(classes)
            counts.append(k)
            assert 1 <= k <= 3 and masks.shape == (k, 32, 32) and boxes.shape == (k, 4)
            assert boxes.dtype == torch.float32 and classes.dtype == torch.int64
            assert bool(masks.flatten(1).any(1).all())  # every listed object is visible
            assert int(masks.sum(0).max()) <= 1  # visible parts are disjoint
            assert torch.equal(masks.any(0), split.masks[i])  # foreground = union of objects
            for box, mask in zip(boxes, masks, strict=True):
                assert box.tolist() == tight_box(mask)
            # the class map, rebuilt from the objects
            expected = (masks.long() * (classes + 1)[:, None, None]).sum(0)
            assert torch.equal(split.class_masks[i], expected)
            # multi-label = the classes whose class-map pixels are present
            present = [bool((split.class_masks[i] == c + 1).any()) for c in range(4)]
            assert split.multilabel(i).tolist() == present
            assert split.multilabel(i).tolist() == [c in set(classes.tolist()) for c in range(4)]
            # label = the class of the object with the most visible pixels (ties: earlier drawn)
            areas = masks.flatten(1).sum(1).tolist()
            assert int(split.labels[i]) == int(classes[areas.index(max(areas))])
        assert max(counts) == 3
        assert torch.equal(split.multilabel_targets,
                           torch.stack([split.multilabel(i) for i in range(len(split))]))
        assert split.multilabel_targets.shape == (len(split), 4)
        assert split.class_masks.dtype == torch.int64 and split.class_masks.shape == (len(split), 32, 32)


def test_each_object_is_painted_in_one_colour_where_its_mask_is():
    split = load(SCENES).train("none")
    for i in range(len(split)):
        image = split.images[i].float()
        for mask in split.object_masks(i):
            if int(mask.sum()) < 4:
                continue
            pixels = image[:, mask]  # 3×P: one colour plus noise of std 0.03·255 ≈ 7.7
            assert float(pixels.std(dim=1).max()) < 12


def test_small_shapes_are_placed_apart():
    split = load("shapes:objects=3,classes=8,size=64,train=12,test=8,rmin=10,rmax=15").train("none")
    for i in range(len(split)):
        assert len(split.object_classes(i)) == 3
        boxes = split.boxes(i)
        # circumcircles kept apart: no object hides more than a sliver of another's box
        for a in range(3):
            for b in range(a + 1, 3):
                lo = torch.maximum(boxes[a, :2], boxes[b, :2])
                hi = torch.minimum(boxes[a, 2:], boxes[b, 2:])
                inter = float((hi - lo).clamp(min=0).prod())
                smaller = min(float((boxes[j, 2:] - boxes[j, :2]).prod()) for j in (a, b))
                assert inter < 0.5 * smaller


def test_scenes_are_reproducible_per_seed_and_index():
    a, b = load(SCENES).train("none"), load(SCENES).train("none")
    for name in ("images", "labels", "masks", "class_masks", "instance_masks", "multilabel_targets"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    other = load(SCENES + ",seed=1").train("none")
    assert not torch.equal(a.images, other.images)
    prefix = load("shapes:objects=3,classes=4,size=32,train=8,test=4").train("none")
    assert torch.equal(prefix.images, a.images[:8])
    assert torch.equal(prefix.class_masks, a.class_masks[:8])
    single = load("shapes:classes=4,size=32,train=16,test=6").train("none")
    assert not torch.equal(single.images, a.images)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("objects=4", "does not fit"),  # 4 shapes of circumradius 22 %: too crowded
        ("objects=2,rmin=45,rmax=45", "does not fit"),
        ("objects=3,size=16,rmin=10", "needs larger shapes"),
        ("objects=0", "out of range"),
        ("objects=17", "out of range"),
        ("objects=two", "not an integer"),
    ],
)
def test_bad_objects_options_are_one_user_error(options, message):
    with pytest.raises(UserError, match=message) as caught:
        load("shapes:" + options)
    assert caught.value.fix


def test_crowded_error_says_what_fits():
    with pytest.raises(UserError) as caught:
        load("shapes:objects=4,rmin=22,rmax=30")
    assert "objects<=3" in caught.value.fix
    load("shapes:objects=3,rmin=22,rmax=30,size=16,train=4,test=4")  # what it offers is valid
    load("shapes:objects=4,rmin=20,rmax=30,size=16,train=4,test=4")


def test_spec_round_trips_through_load_and_the_generic_helpers():
    spec = "shapes:objects=3,classes=4,size=32,train=8,test=4"
    bundle = load(spec)
    info = bundle.info
    assert info.spec == spec and info.name == "shapes" and info.num_classes == 4
    assert info.has_boxes and info.has_masks and info.image_size == 32
    train, test = bundle.train("none"), bundle.test()
    assert (len(train), len(test)) == (8, 4)
    augmented = bundle.train()  # the default augmentation keeps the targets
    image, label = augmented[0]
    assert image.shape == (3, 32, 32) and label == int(train.labels[0])
    assert torch.equal(augmented.class_masks, train.class_masks)
    assert torch.equal(augmented.multilabel(3), train.multilabel(3))
    assert dataset_labels(train) == train.labels.tolist() == train.targets
    view = Subset(train, [5, 2])
    assert torch.equal(dataset_boxes(view, 1), train.boxes(2))
