"""The card is the default view of the data (issue 10, case 1): size, normalisation, classes."""

from __future__ import annotations

import json

import pytest
import torch
from userdata import CLASS_NAMES, make_folder_split

from narrows.cli import main
from narrows.errors import UserError
from narrows.models import ModelCard, create, save_model
from narrows.models.inputs import accepts_input_size, data_for_model, size_kwargs


def _card(arch: str, size: int, spec: str, **kwargs) -> ModelCard:
    return ModelCard(architecture=arch, num_classes=3, in_chans=3, input_size=size,
                     mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), class_names=CLASS_NAMES[:3],
                     data_spec=spec, model_kwargs=kwargs)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    return make_folder_split(tmp_path_factory.mktemp("pics"), per_class=2, size=40)


def test_the_cards_size_and_normalisation_are_the_default(spec):
    served = data_for_model(spec, _card("resnet20_cifar", 48, spec), say=print)
    image, _ = served.bundle.test()[0]
    assert served.image_size == 48 and tuple(image.shape) == (3, 48, 48)
    assert served.mean == (0.5, 0.4, 0.3) and served.std == (0.2, 0.25, 0.3)


def test_another_size_is_a_note_for_a_cnn_and_refused_for_a_fixed_size_vit(spec):
    said: list[str] = []
    cnn = create("resnet20_cifar", num_classes=3)
    served = data_for_model(spec, _card("resnet20_cifar", 48, spec), cnn, image_size=40,
                            say=said.append)
    assert served.image_size == 40 and said and said[0].startswith("note:")
    vit = create("vit_tiny_patch16_224", num_classes=3, **size_kwargs("vit_tiny_patch16_224", 64))
    assert accepts_input_size(vit, 64, 3) and not accepts_input_size(vit, 48, 3)
    with pytest.raises(UserError, match="built for 64×64 inputs and cannot take 48×48"):
        data_for_model(spec, _card("vit_tiny_patch16_224", 64, spec, img_size=64), vit,
                       image_size=48)


def test_image_size_on_a_fixed_size_data_set_must_match():
    with pytest.raises(UserError, match="served at 32×32"):
        data_for_model("digits", None, image_size=48)
    assert data_for_model("digits", None, image_size=32).image_size == 32


def test_size_kwargs_only_for_fixed_size_models():
    assert size_kwargs("vit_tiny_patch16_224", 64) == {"img_size": 64}
    assert size_kwargs("vit_tiny_patch16_224", 224) == {}
    assert size_kwargs("resnet18", 64) == {}


def test_evaluate_serves_the_checkpoint_at_its_trained_size(spec, tmp_path, capsys):
    """Before: evaluate read the folder at 224 px whatever size the model was trained at."""
    torch.manual_seed(0)
    path = tmp_path / "r18.pt"
    save_model(path, create("resnet18", num_classes=3), _card("resnet18", 48, spec))
    assert main(["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    assert main(["evaluate", "--checkpoint", str(path), "--out", str(tmp_path / "b"),
                 "--no-progress", "--image-size", "48"]) == 0
    default, explicit = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert default["image_size"] == 48 and default["loss"] == explicit["loss"]
    assert "note:" not in capsys.readouterr().out
