"""Token features of ViTs (narrows.models.features) and the on-disk feature store
(narrows.data.feature_store): slicing checked against the ViT's own tokens, hooks that perturb
single tokens, and a killed store pass resumed bit for bit."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from tiny import SSL_TINY, SSL_VIT

from narrows.data.feature_store import FeatureStore, cache_key
from narrows.data.streaming import Streaming, stream_dataset
from narrows.errors import UserError
from narrows.models.features import (
    FeatureSpec,
    class_tokens,
    feature_dim,
    feature_function,
    patch_grid,
    select,
    token_parts,
)
from narrows.models.vit_tokens import create_vit, intermediate_class_tokens, last_tokens


def vit(n_c: int, seed: int = 0):
    torch.manual_seed(seed)
    return create_vit(SSL_VIT, num_class_tokens=n_c, img_size=32, **SSL_TINY).eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- specs ---------------------------------------------------------------------------------------

def test_spec_parse_and_key():
    assert FeatureSpec.parse("cls").key == "cls"
    assert FeatureSpec.parse("cls+|cls@4") == FeatureSpec(("cls", "cls+"), 4)
    assert FeatureSpec.parse("cls|cls+@4").key == "cls|cls+@4"
    assert FeatureSpec.parse("avgpool|cls").key == "cls|avgpool"
    assert FeatureSpec.parse("pre-logits").parts == ("pre-logits",)
    assert FeatureSpec.parse("avgpool@4").key == "avgpool"  # @N counts class-token blocks
    for bad in ("cls|cls", "tokens", "cls@0", "cls@x", "pre-logits|cls", "pre-logits@2"):
        with pytest.raises(UserError):
            FeatureSpec.parse(bad)


# -- token slicing -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_c", [1, 2])
@torch.no_grad()
def test_token_parts_are_the_normed_tokens(n_c):
    model, x = vit(n_c), images()
    parts = token_parts(model, x, 1, patches=True)
    normed = model.norm(last_tokens(model, x))
    assert class_tokens(model) == n_c
    torch.testing.assert_close(parts["cls"][:, -1], normed[:, 0])
    if n_c == 2:
        torch.testing.assert_close(parts["cls+"][:, -1], normed[:, 1])
    else:
        assert "cls+" not in parts
    torch.testing.assert_close(parts["patches"], normed[:, n_c:])
    torch.testing.assert_close(parts["avgpool"], normed[:, n_c:].mean(1))
    assert parts["patches"].shape[1] == 16 and patch_grid(model, 32) == (4, 4)
    # the forward of the model itself agrees on the class token (timm: norm, then token 0)
    torch.testing.assert_close(parts["cls"][:, -1], model.forward_head(model.forward_features(x),
                                                                      pre_logits=True))


def _hook_last_block(model, change):
    def hook(module, inputs, output):
        out = output.clone()
        change(out)
        return out

    return model.blocks[-1].register_forward_hook(hook)


@pytest.mark.parametrize("n_c", [1, 2])
@torch.no_grad()
def test_avgpool_never_reads_class_tokens(n_c):
    model, x = vit(n_c), images()
    plain = token_parts(model, x)["avgpool"]

    def zero_class(out):
        out[:, :n_c] = 0.0

    handle = _hook_last_block(model, zero_class)
    perturbed = token_parts(model, x)
    handle.remove()
    torch.testing.assert_close(perturbed["avgpool"], plain, rtol=0, atol=0)
    assert not torch.allclose(perturbed["cls"][:, -1], token_parts(model, x)["cls"][:, -1])

    def shift_patch(out):
        out[:, n_c + 3] += torch.linspace(-1.0, 1.0, out.shape[-1])  # LayerNorm ignores a constant

    handle = _hook_last_block(model, shift_patch)
    moved = token_parts(model, x)["avgpool"]
    handle.remove()
    assert (moved - plain).abs().max() > 1e-4


@torch.no_grad()
def test_registers_are_not_patches_or_class_tokens():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(SSL_VIT, pretrained=False, num_classes=0, img_size=32,
                              reg_tokens=4, **SSL_TINY).eval()
    x = images()
    assert class_tokens(model) == 1 and model.num_prefix_tokens == 5
    parts = token_parts(model, x, patches=True)
    normed = model.norm(last_tokens(model, x))
    assert parts["patches"].shape[1] == 16
    torch.testing.assert_close(parts["avgpool"], normed[:, 5:].mean(1))
    assert "cls+" not in parts
    with pytest.raises(UserError, match="cls"):
        feature_function(model, "cls+")


@torch.no_grad()
def test_no_class_token_vit_gives_avgpool_only():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(SSL_VIT, pretrained=False, num_classes=0, img_size=32,
                              class_token=False, global_pool="avg", **SSL_TINY).eval()
    x = images()
    assert class_tokens(model) == 0
    parts = token_parts(model, x)
    assert set(parts) == {"avgpool"}
    # through fc_norm, as the model pools itself
    torch.testing.assert_close(parts["avgpool"], model.forward_head(model.forward_features(x),
                                                                    pre_logits=True))
    with pytest.raises(UserError):
        feature_function(model, "cls")


@pytest.mark.parametrize("n_c", [1, 2])
@torch.no_grad()
def test_select_order_dims_and_intermediate_blocks(n_c):
    model, x = vit(n_c), images()
    reference = intermediate_class_tokens(model, x, 2)  # [2, B, n_c, D]
    parts = token_parts(model, x, 2)
    d = model.embed_dim
    spec = "cls|cls+|avgpool@2" if n_c == 2 else "cls|avgpool@2"
    out = select(parts, spec)
    assert out.shape == (3, feature_dim(model, spec))
    expected = [reference[0, :, 0], reference[1, :, 0]]
    if n_c == 2:
        expected += [reference[0, :, 1], reference[1, :, 1]]
    expected.append(parts["avgpool"])
    torch.testing.assert_close(out, torch.cat(expected, 1))
    # cls@1 taken out of a 2-block pass is the newest block
    torch.testing.assert_close(select(parts, "cls"), reference[1, :, 0])
    # feature_function does the same in one call
    torch.testing.assert_close(feature_function(model, "cls@2")(x),
                               reference.permute(1, 0, 2, 3)[:, :, 0].flatten(1))
    assert feature_dim(model, "cls@2") == 2 * d
    with pytest.raises(UserError):
        select(parts, "cls@3")
    with pytest.raises(UserError):
        feature_function(model, "cls@3")  # deeper than the ViT


def test_cls_plus_refused_on_one_token():
    with pytest.raises(UserError, match="cls\\+"):
        feature_function(vit(1), "cls|cls+")


def test_pre_logits_is_the_classifier_input():
    from narrows.models import create, pooled_features

    torch.manual_seed(0)
    net = create("resnet20_cifar", num_classes=10).eval()
    x = images(4)
    with torch.no_grad():
        ours = feature_function(net, "pre-logits")(x)
        torch.testing.assert_close(ours, pooled_features(net)(x))
    assert ours.shape[1] == feature_dim(net, "pre-logits")
    with pytest.raises(UserError):
        feature_function(net, "cls")


def test_patch_grid_refuses_non_multiples():
    assert patch_grid(vit(2), 40) == (5, 5)
    with pytest.raises(UserError, match="multiple"):
        patch_grid(vit(2), 30)


# -- the store -----------------------------------------------------------------------------------

class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 8) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i % 7


def parts_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = x.flatten(1)
    return {"a": flat[:, :5] * 2.0, "b": flat[:, 5:11].reshape(-1, 2, 3)}


SHAPES = {"a": (5,), "b": (2, 3)}


class Killed(RuntimeError):
    pass


def fill(directory, dataset, *, kill_after: int | None = None, key="k1", save_every=2):
    store = FeatureStore.open(directory, key=key, total=len(dataset), shapes=SHAPES)
    if store.complete:
        return store, 0
    calls = [0]

    def step(x, y):
        calls[0] += 1
        if kill_after is not None and calls[0] > kill_after:
            raise Killed
        store.append(parts_of(x), y)

    how = Streaming(batch_size=4, progress=False, resume=directory / "partial.pt",
                    save_every=save_every)
    stream_dataset(dataset, step, store, how, key={"key": key})
    store.finish()
    return store, calls[0]


def test_store_killed_pass_resumes_bit_for_bit(tmp_path):
    data = Images(37)
    whole, _ = fill(tmp_path / "whole", data)
    with pytest.raises(Killed):
        fill(tmp_path / "cut", data, kill_after=5)
    half = FeatureStore.open(tmp_path / "cut", key="k1", total=37, shapes=SHAPES)
    assert half.done == 16 and not half.complete  # saved after batches 2 and 4
    resumed, batches = fill(tmp_path / "cut", data)
    assert batches == 10 - 4  # only the batches after the last save ran
    for part in ("a", "b"):
        assert torch.equal(resumed.read(part), whole.read(part))
    assert torch.equal(resumed.labels, whole.labels)
    x = torch.stack([data[i][0] for i in range(37)])
    torch.testing.assert_close(whole.read("a"), parts_of(x)["a"])
    torch.testing.assert_close(whole.read("b", slice(3, 9)), parts_of(x)["b"][3:9])
    # complete: reused without a pass; another key: recomputed in the same place
    again, batches = fill(tmp_path / "whole", data)
    assert again.complete and batches == 0
    other, batches = fill(tmp_path / "whole", data, key="k2")
    assert batches == 10 and other.meta["key"] == "k2"


def test_store_float16_and_keys(tmp_path):
    data = Images(9)
    store = FeatureStore.open(tmp_path / "h", key="k", total=9, shapes=SHAPES, dtype="float16")
    x = torch.stack([data[i][0] for i in range(9)])
    store.append(parts_of(x), torch.arange(9))
    store.finish()
    out = store.read("a")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, parts_of(x)["a"].half().float())
    assert cache_key(a=1, b=[1, 2]) == cache_key(b=[1, 2], a=1) != cache_key(a=2, b=[1, 2])
    assert len(cache_key(a=1)) == 16
    with pytest.raises(UserError):
        FeatureStore.open(tmp_path / "x", key="k", total=1, shapes=SHAPES, dtype="int8")


def test_store_memory_is_bounded(tmp_path):
    """20,000 rows of 128 floats (10 MB) pass through with a peak of a few batches (what
    Python and numpy allocate: the memmap writes are not in it)."""

    class Flat(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20_000

        def __getitem__(self, i: int):
            return torch.full((128,), float(i)), 0

    shapes = {"f": (128,)}
    store = FeatureStore.open(tmp_path / "big", key="m", total=20_000, shapes=shapes)
    batch = 500
    how = Streaming(batch_size=batch, progress=False)
    tracemalloc.start()
    stream_dataset(Flat(), lambda x, y: store.append({"f": x}, y), store, how)
    store.finish()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row_bytes = 128 * 4
    assert peak < 2 * batch * row_bytes + 2_000_000  # ≪ 20,000 × 128 × 4 = 10.2 MB
    assert float(store.read("f")[12_345, 0]) == 12_345.0
    assert np.load(tmp_path / "big" / "f.npy", mmap_mode="r").shape == (20_000, 128)


@pytest.mark.parametrize("n_c", [1, 2])
def test_a_vits_pre_logits_come_from_the_token_pass(n_c):
    from narrows.models.heads import pooled_features
    from narrows.ssl.backbones import _part_function

    model = vit(n_c)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    parts_of, _ = _part_function(model, [FeatureSpec.parse("pre-logits"),
                                         FeatureSpec.parse("cls")], patches=False)
    with torch.no_grad():
        parts = parts_of(x)
        assert len(calls) == 1  # one forward for both
        torch.testing.assert_close(parts["pre-logits"], pooled_features(model)(x).flatten(1))
    hook.remove()
