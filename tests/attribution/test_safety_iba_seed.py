"""Issue 11 item 4: an image's random draws are keyed on (seed, dataset index), so a heatmap does
not depend on the images explained before it and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tiny import seeded_model

from narrows.cli import main

TINY = "shapes:classes=2,size=16,train=16,test=8"
pytestmark = pytest.mark.filterwarnings("ignore:feature statistics from only")


@pytest.fixture(scope="module")
def setup(random_checkpoint, tmp_path_factory) -> tuple[str, str]:
    """(checkpoint, statistics file) shared by the runs, so only the noise can differ."""
    checkpoint = random_checkpoint(TINY)
    out = tmp_path_factory.mktemp("iba-seed") / "stats"
    assert main(["attribution", "stats", "--checkpoint", checkpoint, "--n-samples", "16",
                 "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    return checkpoint, str(out / "statistics.pt")


def _explain(setup, out, indices: list[int], method: str = "iba") -> dict[int, np.ndarray]:
    checkpoint, stats = setup
    args = ["attribution", "explain", "--checkpoint", checkpoint, "--method", method,
            "--indices", *map(str, indices), "--steps", "2", "--iba-batch", "2",
            "--statistics", stats, "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    with np.load(out / "heatmaps.npz") as data:
        return dict(zip(data["indices"].tolist(), data["heatmaps"], strict=True))


def test_heatmap_does_not_depend_on_earlier_images(setup, tmp_path):
    together = _explain(setup, tmp_path / "abc", [0, 1, 2])
    alone = _explain(setup, tmp_path / "c", [2])
    np.testing.assert_array_equal(together[2], alone[2])


def test_resumed_run_equals_uninterrupted(setup, tmp_path):
    full = _explain(setup, tmp_path / "full", [0, 1, 2])
    out = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", out)
    shutil.rmtree(out / "items" / "2")  # as if killed before image 2 was saved
    (out / "heatmap_2.png").unlink()
    resumed = _explain(setup, out, [0, 1, 2])
    for i in (0, 1, 2):
        np.testing.assert_array_equal(full[i], resumed[i])


def test_random_baseline_differs_per_image_and_repeats(setup, tmp_path):
    first = _explain(setup, tmp_path / "r1", [0, 1], method="random")
    again = _explain(setup, tmp_path / "r2", [1], method="random")
    assert not np.array_equal(first[0], first[1])  # was one permutation for every image
    np.testing.assert_array_equal(first[1], again[1])


def test_seeded_iba_leaves_global_rng_alone():
    from narrows.attribution import IBA

    net = seeded_model("resnet20_cifar", num_classes=2, in_chans=3).eval()
    x = torch.randn(2, 3, 16, 16)
    iba = IBA(net, "layer2", steps=2, batch_size=2, seed=3)
    iba.estimate([x], n_samples=2)
    state = torch.get_rng_state()
    a = iba.attribute(x, 0, ids=[7, 9]).heatmaps
    assert torch.equal(state, torch.get_rng_state())
    b = iba.attribute(x[1:], 0, ids=[9]).heatmaps
    np.testing.assert_array_equal(a[1], b[0])


def test_noise_is_keyed_on_seed_and_image_id():
    """The bottleneck's noise (which drives IBA's fit on a trained model) comes from the
    (seed, image id) generator, whatever the global RNG did before."""
    from narrows.attribution import IBA
    from narrows.models import create

    net = create("resnet20_cifar", num_classes=2, in_chans=3).eval()
    iba = IBA(net, "layer2", steps=1, batch_size=2, seed=3)
    iba.estimate([torch.randn(2, 3, 16, 16)], n_samples=2)
    bottleneck = iba._bottleneck(torch.device("cpu"))
    r = torch.randn(2, *bottleneck.alpha.shape)
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        bottleneck.generator = iba._generator(9, torch.device("cpu"))
        draws.append(bottleneck(r))
    assert torch.equal(draws[0], draws[1])
    bottleneck.generator = iba._generator(10, torch.device("cpu"))
    assert not torch.equal(draws[0], bottleneck(r))
