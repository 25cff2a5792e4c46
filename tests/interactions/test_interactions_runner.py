"""Interactions on real (tiny) models: masking, resume without recomputation, torchrun, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import random_checkpoint_at, seeded_model

from narrows.cli import main
from narrows.data import load
from narrows.interactions.players import PlayerGrid, normalised_baseline
from narrows.interactions.runner import InteractionSettings, multi_order, plan, run
from narrows.training import Normalizer

DATA = "shapes:classes=2,size=16,train=24,test=8"


def test_player_masks_are_row_major_patches():
    grid = PlayerGrid(4, 8, 12)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 1 * 4 + 2] = True  # row 1, column 2
    pixels = grid.to_pixels(mask)[0, 0]
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[2:4, 6:9] = True
    assert torch.equal(pixels, expected)
    image = torch.randn(3, 8, 12)
    base = normalised_baseline("zero", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 8, 12))
    out = grid.mask(image, mask, base)[0]
    assert torch.equal(out[:, 2:4, 6:9], image[:, 2:4, 6:9])
    assert torch.allclose(out[:, 0, 0], torch.full((3,), -2.0))  # black pixel, normalised
    assert torch.equal(normalised_baseline("mean", (0.5,) * 3, (0.2,) * 3, (3, 2, 2)),
                       torch.zeros(3, 2, 2))
    with pytest.raises(Exception, match="does not divide"):
        PlayerGrid(5, 8, 12)


def tiny_setup():
    data = load(DATA)
    model = seeded_model("resnet20_cifar", num_classes=2).eval()
    return data, model


def test_in_memory_api_shapes_and_reward_choice():
    data, model = tiny_setup()
    images = torch.stack([data.test()[i][0] for i in range(2)])
    settings = InteractionSettings(grid=4, pairs=3, contexts=2, ratios=(0.0, 0.5, 1.0))
    res = multi_order(model, images, [0, 1], mean=data.info.mean, std=data.info.std,
                      settings=settings)
    assert res.dv.shape == (2, 3, 3, 2) and res.orders == (0, 7, 14)
    assert np.isfinite(res.J()).all()
    # at r = 0 and r = 1 the K contexts are identical, so Δv repeats across K
    assert (res.dv[:, [0, 2], :, 0] == res.dv[:, [0, 2], :, 1]).all()


def test_killed_run_resumes_without_recomputing_finished_images(tmp_path):
    data, model = tiny_setup()
    dataset = data.split("train")  # no augmentation: every access gives the same image
    settings = InteractionSettings(grid=4, pairs=3, contexts=3, ratios=(0.0, 0.3, 0.6, 1.0),
                                   images=4, only_correct=False, batch_size=16)
    normalizer = Normalizer(data.info.mean, data.info.std)
    p = plan(model, dataset, 2, settings, normalizer, torch.device("cpu"))
    assert len(p.image_ids) == 4
    kwargs = dict(mean=data.info.mean, std=data.info.std, device=torch.device("cpu"),
                  progress=False)
    reference = run(model, dataset, p, settings, images_dir=tmp_path / "ref", **kwargs)

    calls = {"n": 0}
    original = model.forward

    def dying_forward(x):
        calls["n"] += 1
        if calls["n"] > p.forwards_per_image // 16 + 2:  # dies inside the second image
            raise KeyboardInterrupt
        return original(x)

    model.forward = dying_forward
    with pytest.raises(KeyboardInterrupt):
        run(model, dataset, p, settings, images_dir=tmp_path / "killed", **kwargs)
    model.forward = original
    assert len(list((tmp_path / "killed").glob("*.npz"))) == 1

    counted = {"n": 0}

    def counting_forward(x):
        counted["n"] += x.shape[0]
        return original(x)

    model.forward = counting_forward
    resumed = run(model, dataset, p, settings, images_dir=tmp_path / "killed", **kwargs)
    model.forward = original
    np.testing.assert_array_equal(resumed.dv, reference.dv)
    np.testing.assert_array_equal(resumed.pairs, reference.pairs)
    first = np.load(tmp_path / "killed" / f"{p.image_ids[0]:07d}.npz")
    assert counted["n"] == resumed.meta["forwards"] - int(first["forwards"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    random_checkpoint_at(path, DATA, class_names=True)
    return path


SMOKE = ["--preset", "smoke", "--images", "4", "--no-only-correct", "--no-progress",
         "--contexts", "3", "--batch-size", "16"]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, checkpoint):
    single = tmp_path / "single"
    assert main(["interactions", "run", "--checkpoint", str(checkpoint), "--out", str(single),
                 *SMOKE]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "narrows", "interactions", "run", "--checkpoint", str(checkpoint), "--out",
           str(tmp_path / "ddp"), "--device", "cpu", *SMOKE]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(single / "dv.npy"), np.load(tmp_path / "ddp" / "dv.npy"))
    a = json.loads((single / "meta.json").read_text())
    b = json.loads((tmp_path / "ddp" / "meta.json").read_text())
    assert a["image_ids"] == b["image_ids"] and a["forwards"] == b["forwards"]


def test_cli_run_plot_compare_and_errors(tmp_path, checkpoint, capsys):
    out = tmp_path / "a"
    assert main(["interactions", "run", "--checkpoint", str(checkpoint), "--out", str(out),
                 *SMOKE]) == 0
    printed = capsys.readouterr().out
    assert "forward passes each" in printed and "without the exact shortcuts" in printed
    for name in ("meta.json", "curve.csv", "curve.png", "dv.npy", "pairs.npy"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["reward"] == "logodds" and meta["preset"] == "smoke"
    assert meta["forwards"] < meta["forwards_upstream"]

    init = tmp_path / "init"
    assert main(["interactions", "run", "--model", "resnet20_cifar", "--data", DATA, "--out",
                 str(init), *SMOKE]) == 0
    fig = tmp_path / "fig.png"
    assert main(["interactions", "plot", str(out), str(init), "--labels", "trained", "init",
                 "--out", str(fig)]) == 0
    assert fig.stat().st_size > 1000

    config = tmp_path / "models.yaml"
    config.write_text(f"data: '{DATA}'\npreset: smoke\nimages: 4\nonly_correct: false\n"
                      f"models:\n  - a={checkpoint}\n  - b=resnet20_cifar\n")
    cmp = tmp_path / "cmp"
    assert main(["interactions", "compare", "--config", str(config), "--out", str(cmp),
                 "--no-progress"]) == 0
    assert (cmp / "compare.png").is_file()
    a = json.loads((cmp / "a" / "meta.json").read_text())
    b = json.loads((cmp / "b" / "meta.json").read_text())
    assert a["image_ids"] == b["image_ids"]
    np.testing.assert_array_equal(np.load(cmp / "a" / "pairs.npy"), np.load(cmp / "b" / "pairs.npy"))

    capsys.readouterr()
    assert main(["interactions", "run", "--checkpoint", str(checkpoint), "--grid", "5",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main(["interactions", "run", "--checkpoint", str(checkpoint), "--pairs", "500",
                 "--preset", "smoke", "--out", str(tmp_path / "bad2")]) == 2
    assert main(["interactions", "plot", str(tmp_path / "nothing")]) == 2
