"""Models and training on the user's own data and modules (issue 10, items 3 and 11).

* item 3: fixed-size models (ViTs) train at the data's size (``img_size`` recorded in the card,
  so every command rebuilds them from it), ``--model-kwargs``, and one line where a model cannot
  take the size, with nothing written;
* item 11: a ``folder:`` set without a test folder holds out a seeded, stratified split;
* own ``nn.Module`` classes named ``file.py:Class`` or ``module:Class``;
* the training curves: integer epochs, plain loss labels, model and data in the title.
"""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
import userdata

from narrows.cli import main
from narrows.cli.train import parse_model_kwargs
from narrows.errors import UserError
from narrows.models import create, create_for_input, load_model, read_checkpoint

QUIET = ["--no-progress", "--threads", "1", "--epochs", "1", "--batch-size", "8"]

MODEL_FILE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, width=8):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Flat32(nn.Module):
    """Takes 32×32 images only, and no num_classes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))
'''


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> str:
    return userdata.make_flat_folder(tmp_path_factory.mktemp("flat") / "flat", per_class=6,
                                     size=24)


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> str:
    return userdata.make_folder_split(tmp_path_factory.mktemp("split") / "split", per_class=4,
                                      size=24)


@pytest.fixture()
def model_file(tmp_path) -> Path:
    path = tmp_path / "mynets.py"
    path.write_text(textwrap.dedent(MODEL_FILE))
    return path


def train(argv: list[str]) -> int:
    return main(["train", *argv, *QUIET])


def card_of(path: Path):
    return read_checkpoint(path).card


# --- item 3: training at another size ----------------------------------------------------


def test_vit_trains_at_another_size_and_is_rebuilt_from_its_card(split, tmp_path):
    out = tmp_path / "vit"
    assert train(["-m", "test_vit", "-d", split, "--image-size", "32", "--out", str(out)]) == 0
    card = card_of(out / "best.pt")
    assert card.input_size == 32 and card.model_kwargs == {"img_size": 32}
    assert json.loads((out / "results.json").read_text())["model_kwargs"] == {"img_size": 32}
    model = load_model(out / "best.pt").model  # the card alone rebuilds it at 32 px
    assert tuple(model.patch_embed.img_size) == (32, 32)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(("name", "size"), [("test_vit", 160), ("resnet18", 48)])
def test_models_build_for_the_data_size(name, size):
    model, kwargs = create_for_input(name, num_classes=3, in_chans=3, image_size=size)
    assert kwargs == {}  # test_vit at its own size and a CNN need no img_size
    assert model.training
    model.eval()
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 3)


def test_model_that_cannot_take_the_size_is_one_line_and_writes_nothing(split, tmp_path, capsys):
    out = tmp_path / "vit8"
    code = train(["-m", "test_vit", "-d", split, "--image-size", "8", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: test_vit cannot run on 8×8 images") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not out.exists()  # no init.pt, no config.yaml


def test_model_kwargs_are_parsed_as_json_scalars():
    assert parse_model_kwargs("drop_rate=0.1,patch_size=8,global_pool=avg,qkv_bias=false,"
                              "x=None,y=[4, 4],z='a,b'") == {
        "drop_rate": 0.1, "patch_size": 8, "global_pool": "avg", "qkv_bias": False, "x": None,
        "y": [4, 4], "z": "a,b"}
    assert parse_model_kwargs(None) == {} and parse_model_kwargs("") == {}
    for bad in ("patch_size", "a=1,a=2", "num_classes=3", "=3", "2x=1"):
        with pytest.raises(UserError):
            parse_model_kwargs(bad)


def test_bad_model_kwargs_are_refused_before_anything_runs(split, tmp_path, capsys):
    out = tmp_path / "bad"
    assert train(["-m", "test_vit", "-d", split, "--model-kwargs", "patch_size", "--out",
                  str(out)]) == 2
    assert "--model-kwargs" in capsys.readouterr().err
    assert not out.exists()


def test_model_kwargs_reach_the_model_and_the_card(split, tmp_path, model_file):
    out = tmp_path / "tiny"
    assert train(["-m", f"{model_file}:TinyNet", "--model-kwargs", "width=5", "-d", split,
                  "--image-size", "16", "--out", str(out)]) == 0
    card = card_of(out / "best.pt")
    assert card.model_kwargs == {"width": 5}
    assert load_model(out / "best.pt").model.conv.out_channels == 5


# --- item 11: a flat folder holds out a test split ---------------------------------------


def _names(dataset) -> set[str]:
    return {Path(p).name for p, _ in dataset.samples}


def test_flat_folder_holds_out_a_seeded_stratified_split(flat, tmp_path, capsys):
    from narrows.data import load

    bundle = load(flat, image_size=16)
    train_set, test_set = bundle.train("none"), bundle.test()
    assert not _names(train_set) & _names(test_set)
    assert len(train_set) + len(test_set) == 18
    # 20 % of 6 per class, rounded: one image of each class is held out
    assert sorted(test_set.targets) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "no val/ split; holding out 20 % of each class (seed 0) as the test split" in out
    # the same files give the same split, whatever the global RNG and wherever the folder is
    torch.manual_seed(123)
    random.seed(5)
    copy = tmp_path / "moved"
    shutil.copytree(flat.split(":", 1)[1], copy)
    again = load(f"folder:{copy}", image_size=16)
    assert _names(again.test()) == _names(test_set)


def test_train_folder_without_val_holds_out_too(tmp_path, capsys):
    from narrows.data import load

    spec = userdata.make_folder_split(tmp_path / "data", per_class=5, size=16)
    shutil.rmtree(tmp_path / "data" / "val")
    bundle = load(spec, image_size=16)
    assert not _names(bundle.train("none")) & _names(bundle.test())
    assert len(bundle.test()) == 3
    assert "has train/ but no val/ or test/ split" in capsys.readouterr().out


def test_training_on_a_flat_folder_tests_on_held_out_images(flat, tmp_path):
    out = tmp_path / "run"
    assert train(["-m", "resnet20_cifar", "-d", flat, "--image-size", "16", "--out",
                  str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["final"]["n"] == 3
    assert results["test_split"] == "20 % of each class held out (seed 0)"


# --- own nn.Modules ------------------------------------------------------------------------


def test_own_module_from_a_file_trains_and_is_rebuilt_from_the_card(
        split, tmp_path, model_file, monkeypatch, capsys):
    out = tmp_path / "own"
    monkeypatch.chdir(model_file.parent)
    assert train(["-m", "mynets.py:TinyNet", "-d", split, "--image-size", "16", "--out",
                  str(out)]) == 0
    card = card_of(out / "best.pt")
    assert card.architecture == f"{model_file.resolve()}:TinyNet"  # made absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--out",
                 str(tmp_path / "ev"), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"note: importing {model_file.resolve()}" in printed


def test_own_module_errors_are_one_line(split, tmp_path, model_file, capsys):
    cases = {
        f"{model_file}:Nope": "has no 'Nope' — it defines Flat32, TinyNet",
        f"{tmp_path}/missing.py:TinyNet": "model file",
        "no_such_package_xyz:Net": "cannot import module 'no_such_package_xyz'",
    }
    for name, expected in cases.items():
        out = tmp_path / "never"
        assert train(["-m", name, "-d", split, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
        assert not out.exists()
    # a module that only takes 32-px images, at 24 px: one line, nothing written
    out = tmp_path / "flat32"
    assert train(["-m", f"{model_file}:Flat32", "-d", split, "--image-size", "24", "--out",
                  str(out)]) == 2
    assert "Flat32 cannot run on 24×24 images" in capsys.readouterr().err
    assert not out.exists()


def test_own_module_from_an_importable_module(tmp_path, model_file, monkeypatch):
    monkeypatch.syspath_prepend(str(model_file.parent))
    model = create("mynets:TinyNet", num_classes=4, in_chans=1, width=3)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_card_naming_a_missing_file_is_one_line(tmp_path, model_file):
    from narrows.models import ModelCard, save_model

    net = create(f"{model_file}:TinyNet", num_classes=3)
    card = ModelCard(architecture=f"{model_file.resolve()}:TinyNet", num_classes=3, in_chans=3,
                     input_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    save_model(tmp_path / "own.pt", net, card)
    moved = tmp_path / "moved.py"
    model_file.rename(moved)
    with pytest.raises(UserError, match="which does not exist"):
        load_model(tmp_path / "own.pt")
    # the same class from where the file is now
    loaded = load_model(tmp_path / "own.pt", name=f"{moved}:TinyNet")
    assert loaded.model.fc.out_features == 3


def test_own_module_checkpoint_without_card_infers_sizes(tmp_path, model_file):
    net = create(f"{model_file}:TinyNet", num_classes=7, in_chans=2)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    model = load_model(tmp_path / "plain.pt", name=f"{model_file}:TinyNet").model
    assert (model.fc.out_features, model.conv.in_channels) == (7, 2)


# --- figures ---------------------------------------------------------------------------------


def _rows(losses: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "train_loss": v, "test_loss": v * 1.1, "train_top1": 0.5,
             "test_top1": 0.4} for i, v in enumerate(losses)]


@pytest.mark.parametrize("losses", [[1.2], [1.2, 1.16, 1.1], [9.0, 2.0, 0.5, 0.1, 0.05]])
def test_curves_have_integer_epochs_plain_labels_and_a_title(losses):
    from narrows.plotting import plot_training_curves, pyplot

    fig, axes = plot_training_curves(_rows(losses), title="test_vit on folder:x")
    fig.canvas.draw()
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)
    labels = [t.get_text() for t in axes[0].get_yticklabels(which="both")]
    assert not any("times" in s or "^" in s or "$" in s for s in labels), labels
    assert fig._suptitle.get_text() == "test_vit on folder:x"
    pyplot().close(fig)
