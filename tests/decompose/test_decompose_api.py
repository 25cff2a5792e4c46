"""The library's defaults are the command's: extract counts the plain train split of a bundle
and the full k grid; decompose takes the extraction itself, its bound method or its indices."""

from __future__ import annotations

import pytest
import torch
from tiny import seeded_model

from narrows.data import load
from narrows.decompose import curve_ks, decompose, extract
from narrows.decompose.head import find_decomposed
from narrows.errors import UserError
from narrows.training import Normalizer

DATA = "shapes:classes=3,size=16,train=24,test=8"


@pytest.fixture(scope="module")
def setup():
    bundle = load(DATA)
    model = seeded_model("resnet20_cifar", num_classes=3).eval()
    return model, bundle, Normalizer(bundle.info.mean, bundle.info.std)


def test_extract_of_a_bundle_is_the_commands_pass(setup):
    model, bundle, normalize = setup
    common = {"num_classes": 3, "k": 2, "normalizer": normalize, "progress": False}
    of_bundle = extract(model, bundle, **common)
    of_split = extract(model, bundle.split("train", "none"), **common)
    assert torch.equal(of_bundle.buckets, of_split.buckets)
    assert torch.equal(of_bundle.images, of_split.images)
    assert list(of_bundle.ks) == sorted({2, *curve_ks(of_bundle.num_channels)})


def test_decompose_takes_the_extraction_or_its_indices(setup):
    model, bundle, normalize = setup
    ex = extract(model, bundle, num_classes=3, k=2, ks=(), normalizer=normalize, progress=False)
    rows = [find_decomposed(decompose(model, given)).rows for given in
            (ex.indices(), ex.indices, ex)]
    assert rows[0] == rows[1] == rows[2]
    with pytest.raises(UserError, match="not ClassIndices"):
        decompose(model, [[1, 2]] * 3)
