"""Attribution on data and models as users bring them: folders, ImageNet trees with box XMLs,
timm models at non-default sizes (issue 10, items 2, 6, 10 and 12, and the figures)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from narrows.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: userdata.py
from tiny import quietly, random_checkpoint_at  # noqa: E402
from userdata import make_folder_split, make_imagenet_tree  # noqa: E402

QUIET = ["--no-progress", "--threads", "1"]
TINY_SHAPES = "shapes:classes=2,size=16,train=16,test=8"


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> str:
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_folder_split(tmp_path_factory.mktemp("folder"))


# -- item 2: one boxes interface; evaluate on folder: and imagenet: data ----------------------


def test_every_dataset_answers_boxes_by_index(imagenet, folder):
    from torch.utils.data import Subset

    from narrows.data import TensorImageDataset, dataset_boxes, dataset_has_boxes, load

    shapes = load(TINY_SHAPES).test()
    assert shapes.has_boxes and shapes.boxes(0).shape == (1, 4)
    assert shapes.boxes(0).dtype == torch.float32
    plain_memory = TensorImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                                      torch.tensor([0, 1]))  # as digits and CIFAR
    assert not plain_memory.has_boxes and plain_memory.boxes(1).shape == (0, 4)
    tree = load(imagenet, image_size=32).test()
    assert tree.has_boxes and tree.boxes(0).shape == (1, 4)
    assert float(tree.boxes(0).max()) <= 32  # in the pixels of the served 32×32 image
    plain = load(folder, image_size=32).test()
    assert not plain.has_boxes and plain.boxes(0).shape == (0, 4)
    view = Subset(tree, [2, 0])
    assert dataset_has_boxes(view) and torch.equal(dataset_boxes(view, 1), tree.boxes(0))


def test_evaluate_bbox_on_an_imagenet_tree(imagenet, tmp_path, capsys):
    out = tmp_path / "evaluate"
    assert main(["attribution", "evaluate", "--model", "resnet20_cifar", "--data", imagenet,
                 "--image-size", "32", "--methods", "random,saliency", "--metrics",
                 "degradation,bbox", "--images", "3", "--points", "4", "--out", str(out),
                 *QUIET]) == 0
    text = (out / "results.csv").read_text()
    assert "bbox_ratio" in text and (out / "examples.png").is_file()


def test_default_metrics_skip_bbox_without_boxes(folder, tmp_path, capsys):
    out = tmp_path / "evaluate"
    assert main(["attribution", "evaluate", "--model", "resnet20_cifar", "--data", folder,
                 "--image-size", "32", "--methods", "random", "--images", "2", "--points", "4",
                 "--out", str(out), *QUIET]) == 0
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "bbox" in notes[0]
    assert "bbox" not in (out / "results.csv").read_text()


@pytest.mark.parametrize("extra, expected", [
    (["--metrics", "bbox"], "no bounding boxes"),
    (["--methods", "iba", "--layer", "nonsense"], "no layer 'nonsense'"),
])
def test_evaluate_refuses_before_any_work(folder, tmp_path, capsys, extra, expected):
    out = tmp_path / "evaluate"
    assert main(["attribution", "evaluate", "--model", "resnet20_cifar", "--data", folder,
                 "--image-size", "32", "--out", str(out), *QUIET, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not out.exists()  # nothing written


# -- item 6: units, sign, all-zero maps, parameters in the metadata ---------------------------


def test_signed_maps_use_a_diverging_scale_and_their_units():
    from narrows.attribution import AttributionResult
    from narrows.plotting import pyplot

    heat = np.array([[[-2.0, 0.0], [1.0, 0.5]]], dtype=np.float32)
    meta = {"method": "integrated_gradients", "units": "logit contribution / pixel",
            "signed": True}
    fig, ax = AttributionResult(heat, targets=[1], meta=meta).plot(
        0, class_names=("cat", "dog"), subject="resnet (test)")
    shown = ax.images[-1]
    assert shown.get_cmap().name == "RdBu_r" and shown.get_clim() == (-2.0, 2.0)
    assert shown.get_array().min() == -2.0  # negative attributions kept
    assert fig.axes[-1].get_ylabel() == "logit contribution / pixel"
    assert "dog" in ax.get_title() and "resnet (test)" in ax.get_title()
    pyplot().close(fig)

    fig, ax = AttributionResult(np.abs(heat), targets=[0], meta={"method": "IBA"}).plot(0)
    assert fig.axes[-1].get_ylabel() == "bits / pixel" and ax.images[-1].get_clim()[0] == 0
    pyplot().close(fig)


def test_an_all_zero_map_says_so():
    from narrows.attribution import AttributionResult
    from narrows.plotting import pyplot

    fig, ax = AttributionResult(np.zeros((1, 4, 4)), meta={"method": "gradcam"}).plot(0)
    assert any("all-zero" in t.get_text() for t in ax.texts)
    pyplot().close(fig)


def test_baseline_metadata_holds_units_and_parameters():
    from narrows.attribution import make_method
    from narrows.models import create

    net = create("resnet20_cifar", num_classes=2).eval()
    cam = make_method("gradcam", net).describe()
    assert cam["parameters"]["layer"] == "layer3" and cam["signed"] is False
    ig = make_method("ig", net, n_steps=7).describe()
    assert ig["method"] == "integrated_gradients" and ig["signed"] is True
    assert ig["parameters"]["n_steps"] == 7 and ig["parameters"]["baseline"] == "zero"
    assert make_method("saliency", net).describe()["units"] != "bits per input pixel"
    json.dumps([cam, ig])


# -- item 10: images spread over classes, class names -----------------------------------------


def test_spread_over_classes_round_robin_and_seeded():
    from narrows.data import spread_over_classes

    labels = [0] * 5 + [1] * 5 + [2] * 2
    picks = spread_over_classes(labels, 6, seed=0)
    assert [labels[i] for i in picks] == [0, 1, 2, 0, 1, 2]
    assert picks == spread_over_classes(labels, 6, seed=0)
    assert spread_over_classes(labels, 4, seed=0) == picks[:4]
    assert sorted(spread_over_classes(labels, 99, seed=1)) == list(range(12))
    assert [labels[i] for i in spread_over_classes(labels, 8, seed=0)][-2:] == [0, 1]
    assert any(spread_over_classes(labels, 6, seed=s) != picks for s in range(1, 5))


def test_explain_spreads_images_over_classes_and_names_them(folder, tmp_path):
    out = tmp_path / "explain"
    assert main(["attribution", "explain", "--model", "resnet20_cifar", "--data", folder,
                 "--image-size", "32", "--method", "random", "--images", "3", "--out", str(out),
                 *QUIET]) == 0
    with np.load(out / "heatmaps.npz") as data:
        names = list(data["target_names"])
    assert sorted(names) == ["circle", "square", "triangle"]


# -- item 12: the feature-statistics note ----------------------------------------------------


def test_statistics_note_is_one_line_once_and_not_after_explicit_n_samples(tmp_path, capsys,
                                                                            random_checkpoint):
    checkpoint = random_checkpoint(TINY_SHAPES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning at all
        assert main(["attribution", "stats", "--checkpoint", checkpoint,
                     "--out", str(tmp_path / "a"), *QUIET]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert len(notes) == 1 and notes[0].startswith("note:") and "--n-samples" in notes[0]
    assert main(["attribution", "stats", "--checkpoint", checkpoint, "--n-samples", "12",
                 "--out", str(tmp_path / "b"), *QUIET]) == 0
    printed = capsys.readouterr().out
    assert "note:" not in printed and "n=12," in printed  # exactly the count asked for


def test_n_samples_is_exact():
    from narrows.attribution import estimate_statistics
    from narrows.models import create

    net = create("resnet20_cifar", num_classes=2).eval()
    stats = quietly(estimate_statistics, net, "layer2", [torch.randn(5, 3, 16, 16)] * 3, n_samples=7)
    assert stats.n == 7


# -- figures ---------------------------------------------------------------------------------


def test_gif_frames_share_one_palette_and_count_steps(tmp_path):
    from PIL import Image

    from narrows.attribution.heatmap import write_gif

    steps = np.stack([np.full((8, 8), v, dtype=np.float32) for v in (0.1, 0.5, 1.0)])
    path = write_gif(tmp_path / "steps.gif", steps, np.zeros((3, 8, 8)), size=80)
    with Image.open(path) as gif:
        frames, palettes = [], []
        for k in range(gif.n_frames):
            gif.seek(k)
            palettes.append(bytes(gif.getpalette() or b""))
            frames.append(np.asarray(gif.convert("RGB")))
    assert len(frames) == 3 and len({p for p in palettes if p}) == 1  # later frames: global
    assert frames[0].shape[0] > 80  # a strip under the heatmap
    # the heatmaps differ (one scale: 0.1 is paler than 1.0) and so do the step counters
    assert not np.array_equal(frames[0][:80], frames[2][:80])
    assert not np.array_equal(frames[0][80:], frames[1][80:])


def test_gif_scale_is_the_final_map_so_the_result_is_not_blank(tmp_path):
    """IBA starts near full capacity and closes: a scale set by the first steps (26 bits) drew
    the final map (0.65 bits) blank. The scale is the final map's; earlier steps saturate."""
    from PIL import Image

    from narrows.attribution.heatmap import write_gif

    final = np.zeros((8, 8), dtype=np.float32)
    final[2:5, 2:5] = 0.65
    steps = np.stack([np.full((8, 8), 26.8, dtype=np.float32), final])
    path = write_gif(tmp_path / "steps.gif", steps, np.zeros((3, 8, 8)), size=80)
    with Image.open(path) as gif:
        gif.seek(1)
        last = np.asarray(gif.convert("RGB"))[:80].astype(int)
    # the object's cells stand out from the background's in the last frame
    assert np.abs(last[30, 30] - last[70, 70]).sum() > 100


# -- timm models at non-default sizes on users' data -----------------------------------------


@pytest.mark.parametrize("architecture, size, kwargs", [
    ("test_vit", 160, {"img_size": 160}),
    ("resnet18", 48, {}),
])
def test_evaluate_timm_models_at_their_card_size(imagenet, tmp_path, architecture, size,
                                                 kwargs):
    checkpoint = random_checkpoint_at(tmp_path / "model.pt", imagenet, architecture,
                                      image_size=size, class_names=True, **kwargs)
    out = tmp_path / "evaluate"
    assert main(["attribution", "evaluate", "--checkpoint", checkpoint, "--methods",
                 "iba,gradcam", "--metrics", "bbox", "--images", "2", "--steps", "1",
                 "--iba-batch", "2", "--n-samples", "8", "--out", str(out), *QUIET]) == 0
    with np.load(out / "heatmaps_iba.npz") as data:
        assert data["heatmaps"].shape == (2, size, size)
    assert "bbox_ratio" in (out / "results.csv").read_text()


def test_statistics_of_another_image_size_are_refused_before_any_work(tmp_path, capsys,
                                                                       random_checkpoint):
    checkpoint = random_checkpoint(TINY_SHAPES)
    assert main(["attribution", "stats", "--checkpoint", checkpoint, "--n-samples", "8",
                 "--out", str(tmp_path / "stats"), *QUIET]) == 0
    out = tmp_path / "evaluate"
    assert main(["attribution", "evaluate", "--checkpoint", checkpoint, "--data",
                 "shapes:classes=2,size=32,train=4,test=4", "--statistics",
                 str(tmp_path / "stats" / "statistics.pt"), "--methods", "iba",
                 "--out", str(out), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "features shaped" in err and not out.exists()


def test_readout_train_on_a_vit_is_one_line_before_any_work(imagenet, tmp_path, capsys):
    checkpoint = random_checkpoint_at(tmp_path / "vit.pt", imagenet, "test_vit", image_size=32,
                                      class_names=True, img_size=32)
    out = tmp_path / "readout"
    assert main(["attribution", "readout-train", "--checkpoint", checkpoint, "--epochs", "1",
                 "--out", str(out), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "token maps" in err and "--methods iba" in err
    assert not out.exists()
