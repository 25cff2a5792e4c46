"""Decompose and kvb on users' data and models: decomposed checkpoints load everywhere (issue 10
item 8), kvb train infers its data and settings from the embeddings (item 9), class names in
figures and tables (item 10), any model whose classifier is its last nn.Linear, and the
folder:/imagenet: × timm resnet18 / test_vit matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from narrows.cli import main
from narrows.data import TensorImageDataset
from narrows.decompose import (
    ClassIndices,
    Extraction,
    accuracy_curve,
    decompose,
    extract,
    load_decomposed,
    split_head,
    validate,
)
from narrows.decompose.essential import EssentialResult
from narrows.decompose.head import decomposed_extra
from narrows.errors import UserError
from narrows.kvb.defaults import default_classes_per_task, scaled_defaults
from narrows.kvb.embeddings import EmbeddingMeta, Embeddings, embedding_path, pooled_features
from narrows.kvb.results import ContinualResult
from narrows.models import ModelCard, create, load_model, save_model
from narrows.models.decomposed import DecomposedLinear, find_decomposed
from narrows.training import Normalizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: userdata.py
from tiny import random_checkpoint_at, seeded_model  # noqa: E402
from userdata import make_flat_folder, make_folder_split, make_imagenet_tree  # noqa: E402

TINY = "shapes:classes=3,size=16,train=24,test=12"
QUIET = ["--no-progress", "--threads", "1", "--device", "cpu"]
NAMES = ("circle", "square", "triangle")


def _results(directory: Path) -> dict:
    return json.loads((directory / "results.json").read_text())


def _card(arch: str, classes: int, size: int, spec: str, names=None, **kwargs) -> ModelCard:
    return ModelCard(architecture=arch, num_classes=classes, in_chans=3, input_size=size,
                     mean=(0.5,) * 3, std=(0.25,) * 3, class_names=names, data_spec=spec,
                     model_kwargs=kwargs)


def _decomposed_checkpoint(path: Path, seed: int = 0) -> tuple[nn.Module, ClassIndices]:
    model = seeded_model("resnet20_cifar", seed, num_classes=3).eval()
    indices = ClassIndices.random(3, 64, 5, seed=seed)
    net = decompose(model, indices)
    with torch.no_grad():  # a fine-tuned V differs from W's entries
        find_decomposed(net).V.add_(0.1 * torch.randn_like(find_decomposed(net).V))
    save_model(path, net, _card("resnet20_cifar", 3, 16, TINY), decomposed_extra(indices))
    return net, indices


# -- item 8: a decomposed checkpoint is a model like any other --------------------------------
def test_load_model_rebuilds_a_decomposed_checkpoint_strictly(tmp_path):
    net, indices = _decomposed_checkpoint(tmp_path / "dec.pt")
    loaded = load_model(tmp_path / "dec.pt")
    head = find_decomposed(loaded.model)
    assert isinstance(head, DecomposedLinear) and head.rows == indices.indices
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), net(x))
    assert find_decomposed(create("resnet20_cifar", checkpoint=tmp_path / "dec.pt")) is not None
    # without a card: --model names the architecture, the classes come from the frozen copy
    save_model(tmp_path / "plain.safetensors", net, _card("resnet20_cifar", 3, 16, TINY))
    state = {k: v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "bare.pt")
    bare = load_model(tmp_path / "bare.pt", name="resnet20_cifar")
    assert find_decomposed(bare.model).rows == indices.indices
    # a damaged head (ids outside the channels) is one clear error
    state["linear.index"] = state["linear.index"] + 1000
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="decomposed head does not fit"):
        load_model(tmp_path / "bad.pt", name="resnet20_cifar")
    assert load_decomposed(tmp_path / "dec.pt").indices.indices == indices.indices


def test_evaluate_of_a_finetuned_checkpoint_equals_decompose_validate_and_the_finetune(
        random_checkpoint, tmp_path, capsys):
    checkpoint = random_checkpoint(TINY)
    indices = ClassIndices.random(3, 64, 5, seed=1)
    indices.save(tmp_path / "idx.json")
    assert main(["decompose", "finetune", "--checkpoint", checkpoint, "--indices",
                 str(tmp_path / "idx.json"), "--epochs", "1", "--batch-size", "8",
                 "--out", str(tmp_path / "ft"), *QUIET]) == 0
    decomposed = tmp_path / "ft" / "decomposed.pt"
    assert main(["evaluate", "--checkpoint", str(decomposed), "--out", str(tmp_path / "ev"),
                 *QUIET]) == 0
    assert main(["decompose", "validate", "--checkpoint", str(decomposed), "--out",
                 str(tmp_path / "val"), *QUIET]) == 0
    evaluated = _results(tmp_path / "ev")["top1"]
    assert evaluated == _results(tmp_path / "val")["decomposed"]["top1"]
    assert evaluated == _results(tmp_path / "ft")["best_top1"]
    assert "unexpected" not in capsys.readouterr().err


# -- item 9: kvb train takes what the embeddings say ------------------------------------------
def _write_embeddings(directory: Path, spec: str, classes: int, *, backbone="net@abcd1234",
                      per_class: int = 6, dim: int = 8, names=None, splits=("train", "test")):
    gen = torch.Generator().manual_seed(classes)
    centres = torch.randn(classes, dim, generator=gen) * 4
    for split in splits:
        labels = torch.arange(classes).repeat_interleave(per_class)
        feats = centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=gen)
        meta = EmbeddingMeta(data=spec, split=split, backbone=backbone, architecture="net",
                             checkpoint=None, checkpoint_sha256=None, dim=dim, count=len(labels),
                             class_names=tuple(names or ()))
        Embeddings(feats, labels, meta).save(embedding_path(directory, backbone, spec, split))


SMALL_KVB = ["--batch-size", "8", "--num-books", "4", "--epochs", "20", "--model", "dkvb",
             "linear", "--protocol", "incremental"]


def test_kvb_train_infers_data_classes_and_scaled_defaults_from_the_embeddings(tmp_path,
                                                                                capsys):
    emb = tmp_path / "emb"
    spec = "folder:/somewhere/three"
    _write_embeddings(emb, spec, 3, names=NAMES)
    run = tmp_path / "run"
    assert main(["kvb", "train", "--embeddings", str(emb), *SMALL_KVB, "--out", str(run),
                 *QUIET]) == 0
    out = capsys.readouterr().out
    assert f"data: {spec}" in out and "--classes-per-task 1" in out
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    config = saved["options"]
    assert config["data"] == spec and config["classes_per_task"] == 1
    assert config["num_pairs"] == 16 and config["dim_key"] == 8  # scaled to 18 keys, D = 8
    matrix = (run / "accuracy_matrix.csv").read_text()
    assert all(name in matrix for name in NAMES)
    # a --classes-per-task that does not divide the classes says which do
    capsys.readouterr()
    assert main(["kvb", "train", "--embeddings", str(emb), *SMALL_KVB, "--classes-per-task",
                 "2", "--out", str(tmp_path / "bad"), *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be cut into tasks of 2" in err and "--classes-per-task 1" in err
    assert "\n" not in err and not (tmp_path / "bad").exists()
    # a key dimension beyond the embeddings' (D = 8) is refused, naming the largest
    assert main(["kvb", "train", "--embeddings", str(emb), *SMALL_KVB, "--dim-key", "1000",
                 "--out", str(tmp_path / "bad"), *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert "--dim-key 1000 exceeds the 8 dimensions" in err and "at most 8" in err
    assert "\n" not in err and not (tmp_path / "bad").exists()
    # two data sets: choose with --data
    _write_embeddings(emb, "digits", 10)
    assert main(["kvb", "train", "--embeddings", str(emb), *SMALL_KVB, "--out",
                 str(tmp_path / "two"), *QUIET]) == 2
    assert "choose one with --data" in capsys.readouterr().err


def test_kvb_defaults_scale_with_the_data():
    assert [default_classes_per_task(c) for c in (2, 3, 4, 10, 7, 100, 1000)] == [
        1, 1, 2, 2, 1, 10, 100]
    with pytest.raises(ValueError):
        default_classes_per_task(1)
    small = scaled_defaults(per_task=6, keys=18, dim=512, batch_size=256)
    assert (small.num_pairs, small.dim_key, small.epochs, small.init_epochs) == (16, 14, 2000, 50)
    cifar = scaled_defaults(per_task=10_000, keys=50_000, dim=512, batch_size=256)
    assert (cifar.num_pairs, cifar.epochs, cifar.init_epochs) == (4096, 26, 10)


def test_kvb_embed_takes_checkpoint_and_model_like_every_command(random_checkpoint, tmp_path):
    checkpoint = random_checkpoint(TINY)
    assert main(["kvb", "embed", "--checkpoint", checkpoint, "--split", "test", "--out",
                 str(tmp_path / "a"), *QUIET]) == 0
    assert main(["kvb", "embed", "--backbone", checkpoint, "--split", "test", "--out",
                 str(tmp_path / "b"), *QUIET]) == 0  # the former name still works
    assert main(["kvb", "embed", "--model", "resnet20_cifar", "--data", TINY, "--split", "test",
                 "--out", str(tmp_path / "c"), *QUIET]) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == [
        p.name for p in (tmp_path / "b").iterdir()]
    assert "resnet20_cifar@init-s0" in next((tmp_path / "c").iterdir()).name


# -- item 10: class names in decompose and kvb figures and tables ----------------------------
def test_class_names_label_decompose_and_kvb_outputs(random_checkpoint, tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    root = tmp_path / "split"
    spec = make_folder_split(root, classes=3, per_class=3, size=16)
    net = seeded_model("resnet20_cifar", num_classes=3)
    save_model(tmp_path / "m.pt", net, _card("resnet20_cifar", 3, 16, spec, NAMES))
    assert main(["decompose", "extract", "--checkpoint", str(tmp_path / "m.pt"), "-k", "2",
                 "--out", str(tmp_path / "ex"), *QUIET]) == 0
    out = capsys.readouterr().out
    assert "class 0 (circle):" in out and "class 2 (triangle):" in out
    extraction = Extraction.load(tmp_path / "ex")
    fig, ax = extraction.plot()
    assert [t.get_text() for t in ax.get_yticklabels()] == list(NAMES)
    essential = EssentialResult([1.0], "replace", torch.zeros(1, 3, 3, dtype=torch.int64).numpy(),
                                torch.ones(3, dtype=torch.int64).numpy(),
                                torch.ones(3, dtype=torch.int64).numpy(),
                                {"class_names": list(NAMES)})
    assert [r["class"] for r in essential.to_rows()] == [*NAMES, "all"]
    result = ContinualResult("dkvb", "incremental", [[2, 0], [1]],
                             [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]], [4, 4],
                             {"class_names": list(NAMES)})
    assert [r["classes"] for r in result.to_rows()][:2] == ["triangle circle", "square"]
    _, axes = result.plot()
    assert "triangle circle" in axes[1].get_legend().get_texts()[0].get_text()


# -- any model whose classifier is its last nn.Linear ----------------------------------------
class Custom(nn.Module):
    """A user's own module: no timm interface, classifier registered last."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.classify = nn.Linear(6, 3)

    def forward(self, x):
        return self.classify(self.body(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("make", [
    lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(6, 3)),
    Custom,
])
def test_decompose_works_on_any_model_whose_classifier_is_the_last_linear(make):
    torch.manual_seed(0)
    model = make().eval()
    features, linear = split_head(model)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(linear(features(x)), model(x), atol=1e-6)
        indices = ClassIndices([[0, 2], [1], [3, 4, 5]], 6)
        masked = F.linear(features(x), linear.weight * indices.mask(), linear.bias)
        assert torch.allclose(decompose(model, indices)(x), masked, atol=1e-6)
        assert pooled_features(model)(x).shape == (5, 6)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    data = TensorImageDataset(images, torch.arange(12) % 3)
    norm = Normalizer((0.5,) * 3, (0.25,) * 3)
    ex = extract(model, data, num_classes=3, k=2, normalizer=norm, progress=False)
    assert ex.num_channels == 6 and ex.indices(2).k == 2
    curve = accuracy_curve(model, data, {"random": lambda k: ClassIndices.random(3, 6, k)},
                           [1, 6], normalizer=norm)
    assert curve.at("random", 6) == curve.full == validate(model, data, normalizer=norm).top1
    # the decomposed model round-trips through its state dict (as load_model does)
    from narrows.models.decomposed import adopt_decomposed_head

    dec = decompose(model, indices)
    fresh = make()
    assert adopt_decomposed_head(fresh, dec.state_dict(), "memory")
    fresh.load_state_dict(dec.state_dict(), strict=True)


def test_a_model_without_a_linear_classifier_is_one_line():
    with pytest.raises(UserError, match="has no nn.Linear layer") as info:
        split_head(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Flatten()))
    assert "\n" not in str(info.value)


# -- users' data × timm models ----------------------------------------------------------------
MATRIX = [
    ("split", make_folder_split, "resnet18", 48, {}),
    ("flat", make_flat_folder, "test_vit", 64, {"img_size": 64}),
    ("imagenet", make_imagenet_tree, "resnet18", 48, {}),
    ("imagenet", make_imagenet_tree, "test_vit", 64, {"img_size": 64}),
]


@pytest.mark.parametrize(("layout", "make", "arch", "size", "kwargs"), MATRIX,
                         ids=[f"{m[0]}-{m[2]}" for m in MATRIX])
def test_decompose_and_kvb_run_on_users_data_and_timm_models(layout, make, arch, size, kwargs,
                                                              tmp_path, capsys):
    spec = make(tmp_path / layout, classes=3, per_class=4, size=size)
    checkpoint = random_checkpoint_at(tmp_path / "m.pt", spec, arch, image_size=size,
                                      class_names=True, **kwargs)
    assert main(["decompose", "extract", "--checkpoint", checkpoint, "-k", "2", "--ks", "2",
                 "--out", str(tmp_path / "ex"), *QUIET]) == 0
    assert main(["decompose", "validate", "--checkpoint", checkpoint, "--indices",
                 str(tmp_path / "ex" / "indices.json"), "--ks", "2", "--out",
                 str(tmp_path / "val"), *QUIET]) == 0
    results = _results(tmp_path / "val")
    assert 0 <= results["decomposed"]["top1"] <= 1 and results["n"] > 0
    assert main(["kvb", "embed", "--checkpoint", checkpoint, "--out", str(tmp_path / "emb"),
                 *QUIET]) == 0
    emb = sorted((tmp_path / "emb").iterdir())
    assert len(emb) == 2
    assert json.dumps(torch.load(emb[0], weights_only=True)["meta"]["preprocessing"])
    assert torch.load(emb[0], weights_only=True)["meta"]["preprocessing"]["image_size"] == size
    assert main(["kvb", "train", "--embeddings", str(tmp_path / "emb"), "--model", "linear",
                 "--protocol", "incremental", "--epochs", "2", "--out",
                 str(tmp_path / "kvb"), *QUIET]) == 0
    assert "tasks of 1" in capsys.readouterr().out
