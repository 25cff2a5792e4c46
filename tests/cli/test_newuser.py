"""Off the demo path: a checkpoint read with another data set's classes, and attribution on a
user's own small CNN (default IBA and Grad-CAM layers found by probing the network)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from narrows.errors import UserError
from narrows.models.card import ModelCard
from narrows.models.inputs import data_for_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: userdata.py
from userdata import CLASS_NAMES, make_folder_split  # noqa: E402


class SmallCNN(nn.Module):
    """A user's network: no layer2/stages/blocks, and a ``features`` that ends flattened."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _card(names: tuple[str, ...], spec: str = "folder:elsewhere") -> ModelCard:
    return ModelCard(architecture="resnet18", num_classes=len(names), in_chans=3, input_size=32,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), class_names=names,
                     data_spec=spec)


def test_checkpoint_of_other_class_names_is_served_with_a_warning(tmp_path: Path) -> None:
    spec = make_folder_split(tmp_path / "pics", per_class=2, size=16)
    said: list[str] = []
    data_for_model(spec, _card(("red square", "green thing", "blue box")), say=said.append)
    assert len(said) == 1 and said[0].startswith("warning:") and "other class names" in said[0]


def test_checkpoint_of_permuted_classes_is_refused(tmp_path: Path) -> None:
    spec = make_folder_split(tmp_path / "pics", per_class=2, size=16)
    permuted = tuple(reversed(CLASS_NAMES[:3]))
    with pytest.raises(UserError, match="another order"):
        data_for_model(spec, _card(permuted), say=lambda _: None)


def test_checkpoint_of_the_same_classes_is_served(tmp_path: Path) -> None:
    spec = make_folder_split(tmp_path / "pics", per_class=2, size=16)
    served = data_for_model(spec, _card(tuple(n.upper() for n in CLASS_NAMES[:3])),
                            say=lambda _: None)
    assert served.image_size == 32


def test_default_layers_of_own_cnn() -> None:
    from narrows.attribution import default_layer, make_method

    model = SmallCNN()
    assert default_layer(model) == "features.4"  # the last spatial map of stride ≤ 8
    gradcam = make_method("gradcam", model)
    assert gradcam.parameters()["layer"] == "features.4"  # not the flattened 'features'
    maps = gradcam.attribute(torch.rand(2, 3, 24, 24), torch.tensor([0, 1]))
    assert maps.shape == (2, 24, 24)


def test_gradcam_on_a_flat_layer_is_one_line() -> None:
    from narrows.attribution import make_method

    gradcam = make_method("gradcam", SmallCNN(), layer="features")
    with pytest.raises(UserError, match="not a \\(channels, height, width\\) map"):
        gradcam.attribute(torch.rand(1, 3, 24, 24), torch.tensor([0]))


def test_no_default_layer_names_the_cli_option() -> None:
    from narrows.attribution import default_layer

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(UserError) as caught:
        default_layer(mlp)
    assert "--layer" in caught.value.fix
