"""narrows.models: CIFAR architectures, model cards, checkpoints and strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from narrows.errors import UserError
from narrows.models import (
    NARROWS_MODELS,
    ModelCard,
    create,
    list_models,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
    save_model,
)
from narrows.models.cifar_common import CIFAR_MEAN, CIFAR_STD
from narrows.models.cifar_resnet import PadShortcut

torch.set_num_threads(min(2, torch.get_num_threads()))

RESNET_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def card_for(arch: str, num_classes: int = 10, in_chans: int = 3, **kw) -> ModelCard:
    mean = CIFAR_MEAN if in_chans == 3 else (0.5,) * in_chans
    std = CIFAR_STD if in_chans == 3 else (0.25,) * in_chans
    return ModelCard(arch, num_classes, in_chans, 32, mean, std, **kw)


def same_outputs(a: nn.Module, b: nn.Module, in_chans: int = 3, size: int = 32) -> bool:
    a.eval()
    b.eval()
    x = torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def akamaster_keys(depth: int) -> set[str]:
    """The state-dict keys of the upstream akamaster ResNet, written out from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "linear.weight", "linear.bias"} | {f"bn1.{p}" for p in bn}
    for stage in (1, 2, 3):
        for block in range((depth - 2) // 6):
            prefix = f"layer{stage}.{block}"
            for i in (1, 2):
                keys.add(f"{prefix}.conv{i}.weight")
                keys |= {f"{prefix}.bn{i}.{p}" for p in bn}
    return keys


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("depth", sorted(RESNET_PARAMS))
def test_resnet_parameter_counts_and_keys(depth: int) -> None:
    model = timm.create_model(f"resnet{depth}_cifar", num_classes=10)
    assert n_params(model) == RESNET_PARAMS[depth]
    assert set(model.state_dict()) == akamaster_keys(depth)


def test_alexnet_parameter_count_and_shapes() -> None:
    model = create("alexnet_cifar", num_classes=10).eval()
    assert n_params(model) == 4_821_322
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 256, 4, 4)
    assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    assert model(x).shape == (2, 10)
    assert model.get_classifier() is model.all_layers[19]
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5, 0.5]


@pytest.mark.parametrize("name", NARROWS_MODELS)
def test_timm_create_model_knows_the_names(name: str) -> None:
    assert timm.is_model(name) and name in timm.list_models("*_cifar")
    model = timm.create_model(name, num_classes=7, pretrained_cfg=None, cache_dir=None).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert model.pretrained_cfg["architecture"] == name


@pytest.mark.parametrize("name", ["resnet20_cifar", "alexnet_cifar"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_timm_create_and_forward(name: str, in_chans: int) -> None:
    model = timm.create_model(
        name, num_classes=7, in_chans=in_chans, pretrained_cfg_overlay=None, cache_dir=None
    ).eval()
    x = torch.randn(2, in_chans, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        features = model.forward_features(x)
    assert model.num_classes == 7
    assert features.shape[1] == model.num_features
    if name.startswith("resnet"):
        assert features.shape == (2, 64, 8, 8)
        assert features.min() >= 0  # after the final ReLU
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (in_chans, 32, 32)
    assert len(cfg["mean"]) == len(cfg["std"]) == in_chans
    assert cfg["classifier"] in dict(model.named_modules())
    if in_chans == 3:
        assert tuple(cfg["mean"]) == CIFAR_MEAN


def test_timm_head_interface() -> None:
    model = create("resnet20_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, 64)
    assert torch.allclose(model.forward_head(features), model.linear(pooled))
    assert model.get_classifier() is model.linear
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_fc_is_an_alias_of_linear() -> None:
    model = create("resnet20_cifar")
    assert model.fc is model.linear
    assert not any(k.startswith("fc.") for k in model.state_dict())
    new_head = nn.Linear(64, 3)
    model.fc = new_head
    assert model.linear is new_head
    assert "fc" not in dict(model.named_children())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_resnet_init_is_kaiming_normal() -> None:
    torch.manual_seed(0)
    model = create("resnet56_cifar")
    weight = model.layer2[3].conv1.weight  # fan_in = 32 * 9
    assert abs(weight.std().item() - (2 / (32 * 9)) ** 0.5) < 0.003


def test_option_a_shortcut_pads_channels_symmetrically() -> None:
    model = create("resnet20_cifar")
    shortcut = model.layer2[0].shortcut
    assert isinstance(shortcut, PadShortcut)
    assert isinstance(model.layer3[0].shortcut, PadShortcut)
    assert not isinstance(model.layer1[0].shortcut, PadShortcut)
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2
    assert all(n_params(m) == 0 and not m.state_dict() for m in shortcuts)

    # channel c holds the value c + 1 at every pixel; odd rows/columns hold -1
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 16, 1, 1).repeat(1, 1, 6, 6)
    x[:, :, 1::2, :] = -1
    x[:, :, :, 1::2] = -1
    out = shortcut(x)
    assert out.shape == (1, 32, 3, 3)
    assert torch.all(out[:, :8] == 0) and torch.all(out[:, 24:] == 0)
    expected = torch.arange(1, 17, dtype=torch.float32).view(1, 16, 1, 1).expand(1, 16, 3, 3)
    assert torch.equal(out[:, 8:24], expected)
    out64 = model.layer3[0].shortcut(torch.ones(1, 32, 4, 4))
    assert out64.shape == (1, 64, 2, 2)
    assert out64[:, :16].abs().sum() == 0 and out64[:, 48:].abs().sum() == 0
    assert torch.all(out64[:, 16:48] == 1)


def test_pretrained_weights_are_refused() -> None:
    with pytest.raises(UserError, match="no pretrained weights"):
        timm.create_model("resnet20_cifar", pretrained=True)
    with pytest.raises(UserError, match="does not download"):
        create("resnet18", pretrained=True)


def test_unknown_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="does not take the option"):
        create("resnet20_cifar", depth_multiplier=2)
    with pytest.raises(UserError, match="cannot build resnet18"):
        create("resnet18", not_an_option=1)
    with pytest.raises(UserError, match="num_classes"):
        create("alexnet_cifar", num_classes=-1)


# --------------------------------------------------------------------------- names


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(UserError) as info:
        create("resnet20_cifr")
    assert "unknown model 'resnet20_cifr'" in info.value.what
    assert "resnet20_cifar" in info.value.fix
    assert "narrows models PATTERN" in info.value.fix
    with pytest.raises(UserError, match="resnet20_cifar"):
        create("resnet20")


def test_list_models_puts_narrows_first() -> None:
    names = list_models("*resnet*")
    assert names[:5] == [f"resnet{d}_cifar" for d in (20, 32, 44, 56, 110)]
    assert "resnet18" in names and "alexnet_cifar" not in names
    assert list_models("cifar") == list(NARROWS_MODELS)
    assert list_models()[: len(NARROWS_MODELS)] == list(NARROWS_MODELS)


# --------------------------------------------------------------------------- model cards


def test_card_round_trip_and_validation() -> None:
    card = card_for("resnet20_cifar", class_names=tuple("abcdefghij"), data_spec="cifar10:/d")
    data = card.to_dict()
    assert ModelCard.from_dict(data) == card
    assert isinstance(data["mean"], list)
    with pytest.raises(UserError, match="missing in_chans"):
        ModelCard.from_dict({k: v for k, v in data.items() if k != "in_chans"})
    with pytest.raises(UserError, match="unknown colour"):
        ModelCard.from_dict({**data, "colour": "red"})
    with pytest.raises(UserError, match="3 values"):
        ModelCard.from_dict({**data, "mean": [0.5]})
    with pytest.raises(UserError, match="class_names"):
        ModelCard.from_dict({**data, "class_names": ["a", "b"]})
    with pytest.raises(UserError):
        ModelCard.from_dict("not a dict")
    minimal = {k: data[k] for k in ("architecture", "num_classes", "in_chans", "input_size")}
    assert ModelCard.from_dict({**minimal, "mean": [0.5] * 3, "std": [0.2] * 3}).class_names is None


# --------------------------------------------------------------------------- checkpoints


def test_upstream_akamaster_checkpoint_loads_strictly(tmp_path: Path) -> None:
    source = create("resnet20_cifar")
    upstream = {
        "best_prec1": 91.78,
        "state_dict": {"module." + k: v for k, v in source.state_dict().items()},
    }
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save(upstream, path)

    checkpoint = read_checkpoint(path)
    assert set(checkpoint.state_dict) == akamaster_keys(20)
    assert checkpoint.card is None and checkpoint.extra == {"best_prec1": 91.78}

    loaded = load_model(path, name="resnet20_cifar")
    assert loaded.card is None and loaded.extra == {"best_prec1": 91.78}
    assert not loaded.model.training
    assert same_outputs(source, loaded.model)
    assert same_outputs(source, create("resnet20_cifar", checkpoint=path))


def test_num_classes_and_in_chans_are_inferred_without_card(tmp_path: Path) -> None:
    source = create("resnet20_cifar", num_classes=100, in_chans=1)
    path = tmp_path / "model.pth"
    torch.save({"model_state_dict": source.state_dict(), "epoch": 3}, path)
    loaded = load_model(path, name="resnet20_cifar")
    assert loaded.model.num_classes == 100 and loaded.extra == {"epoch": 3}
    assert same_outputs(source, loaded.model, in_chans=1)


def test_compiled_and_wrapped_prefixes_are_stripped(tmp_path: Path) -> None:
    source = create("resnet20_cifar")
    for wrapper in ("state_dict", "model", "teacher", None):
        weights = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
        obj = weights if wrapper is None else {wrapper: weights, "optimizer": {"lr": 0.1}}
        path = tmp_path / f"{wrapper}.pt"
        torch.save(obj, path)
        checkpoint = read_checkpoint(path)
        assert set(checkpoint.state_dict) == akamaster_keys(20)
        assert checkpoint.extra == ({} if wrapper is None else {"optimizer": {"lr": 0.1}})


def test_narrows_pt_round_trip_rebuilds_from_card(tmp_path: Path) -> None:
    model = create("alexnet_cifar", num_classes=4, in_chans=1)
    card = card_for("alexnet_cifar", num_classes=4, in_chans=1, class_names=("a", "b", "c", "d"))
    path = save_model(tmp_path / "run" / "model.pt", model, card, extra={"epoch": 7})
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "narrows_card", "epoch"}
    loaded = load_model(path)
    assert loaded.card == card and loaded.extra == {"epoch": 7}
    assert same_outputs(model, loaded.model, in_chans=1)
    assert same_outputs(model, create("alexnet_cifar", checkpoint=path), in_chans=1)


def test_safetensors_round_trip_with_card(tmp_path: Path) -> None:
    model = create("resnet20_cifar", num_classes=3)
    card = card_for("resnet20_cifar", num_classes=3, data_spec="shapes")
    path = save_model(tmp_path / "model.safetensors", model, card)
    checkpoint = read_checkpoint(path)
    assert checkpoint.card == card and checkpoint.extra == {}
    loaded = load_model(path)
    assert same_outputs(model, loaded.model)
    with pytest.raises(UserError, match="epoch"):
        save_model(tmp_path / "other.safetensors", model, card, extra={"epoch": 1})
    assert not (tmp_path / "other.safetensors").exists()


def test_card_contradictions_are_user_errors(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.pt", create("resnet20_cifar"), card_for("resnet20_cifar"))
    with pytest.raises(UserError, match="--model"):
        load_model(path, name="resnet32_cifar")
    with pytest.raises(UserError, match="--num-classes"):
        load_model(path, num_classes=100)
    assert load_model(path, name="resnet20_cifar", num_classes=10).model.num_classes == 10


def test_checkpoint_without_card_needs_a_model_name(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(create("resnet20_cifar").state_dict(), path)
    with pytest.raises(UserError) as info:
        load_model(path)
    assert "--model" in info.value.fix


def test_wrong_head_size_lists_shapes(tmp_path: Path) -> None:
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save({"state_dict": create("resnet20_cifar", num_classes=100).state_dict()}, path)
    with pytest.raises(UserError) as info:
        create("resnet20_cifar", num_classes=10, checkpoint=path)
    message = str(info.value)
    assert f"checkpoint {path} does not fit resnet20_cifar" in message
    assert "linear.weight (checkpoint 100×64, model 10×64)" in message
    assert "linear.bias (checkpoint 100, model 10)" in message
    assert "--num-classes" in info.value.fix and "100" in info.value.fix


def test_wrong_in_chans_hint() -> None:
    one_channel = create("resnet20_cifar", in_chans=1).state_dict()
    with pytest.raises(UserError) as info:
        load_state_dict_strict(create("resnet20_cifar"), one_channel, "x.pt")
    assert "conv1.weight (checkpoint 16×1×3×3, model 16×3×3×3)" in info.value.what
    assert "--in-chans" in info.value.fix and "(1)" in info.value.fix
    assert "--num-classes" not in info.value.fix


def test_missing_and_unexpected_keys_are_listed() -> None:
    model = create("resnet20_cifar")
    state = dict(model.state_dict())
    del state["layer1.0.conv1.weight"]
    state["layer4.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as info:
        load_state_dict_strict(model, state, "x.pt")
    assert "missing layer1.0.conv1.weight" in info.value.what
    assert "unexpected layer4.0.conv1.weight" in info.value.what

    resnet32 = create("resnet32_cifar")
    with pytest.raises(UserError) as info:
        load_state_dict_strict(resnet32, model.state_dict(), "x.pt")
    assert "missing " in info.value.what and " more" in info.value.what
    assert info.value.what.count("layer") <= 12  # long lists are cut


def test_strict_loading_leaves_model_untouched_on_error() -> None:
    model = create("resnet20_cifar")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if k != "linear.bias"}
    with pytest.raises(UserError):
        load_state_dict_strict(model, bad, "x.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_timm_model_round_trip(tmp_path: Path) -> None:
    model = create("resnet18", num_classes=5)
    card = ModelCard("resnet18", 5, 3, 32, CIFAR_MEAN, CIFAR_STD)
    for suffix in (".pt", ".safetensors"):
        loaded = load_model(save_model(tmp_path / f"r18{suffix}", model, card))
        assert same_outputs(model, loaded.model)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    assert load_model(tmp_path / "plain.pth", name="resnet18").model.num_classes == 5


def test_timm_model_kwargs_in_card(tmp_path: Path) -> None:
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    model = create("vit_tiny_patch16_224", num_classes=4, **kwargs)
    card = ModelCard("vit_tiny_patch16_224", 4, 3, 32, CIFAR_MEAN, CIFAR_STD, model_kwargs=kwargs)
    loaded = load_model(save_model(tmp_path / "vit.pt", model, card))
    assert loaded.card is not None and loaded.card.model_kwargs == kwargs
    assert same_outputs(model, loaded.model)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.pt", b"this is not a checkpoint", "cannot read checkpoint"),
        ("bad.safetensors", b"\x00\x01garbage", "cannot read checkpoint"),
        ("empty.pth", b"", "cannot read checkpoint"),
        ("model.ckpt", b"", "unknown suffix"),
    ],
)
def test_corrupt_or_unknown_files_are_user_errors(
    tmp_path: Path, name: str, content: bytes, match: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_model(path, name="resnet20_cifar")


def test_truncated_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    path = save_model(tmp_path / "m.pt", create("resnet20_cifar"), card_for("resnet20_cifar"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        read_checkpoint(path)


class _Opaque:
    pass


def test_pickled_objects_and_odd_contents_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "args.pth"
    torch.save({"state_dict": create("resnet20_cifar").state_dict(), "args": _Opaque()}, path)
    with pytest.raises(UserError, match=r"Python object \(.*_Opaque\)"):
        read_checkpoint(path)
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "nostate.pth")
    with pytest.raises(UserError, match="no state dict"):
        read_checkpoint(tmp_path / "nostate.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a dict"):
        read_checkpoint(tmp_path / "list.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.pt", name="resnet20_cifar")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(UserError, match="directory"):
        read_checkpoint(tmp_path / "dir.pt")
    torch.save({"state_dict": {}, "narrows_card": {"architecture": "x"}}, tmp_path / "card.pt")
    with pytest.raises(UserError):
        read_checkpoint(tmp_path / "card.pt")


def test_no_lenient_loading_in_the_package() -> None:
    package = Path(__file__).resolve().parents[2] / "src" / "narrows" / "models"
    for source in package.glob("*.py"):
        assert "strict=False" not in source.read_text(), source
