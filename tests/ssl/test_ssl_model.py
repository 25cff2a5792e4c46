"""The UDI networks: token access on timm ViTs, SRS attention, the shared head, student/teacher roles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import SSL_HEAD, SSL_TINY, SSL_VIT
from torch import nn

from narrows.errors import UserError
from narrows.models.vit_tokens import (
    class_token_count,
    create_vit,
    intermediate_class_tokens,
    last_attention,
    last_tokens,
)
from narrows.ssl.model import DINOHead, SRSAttention, UDIModel, build_pair

VIT, TINY, HEAD = SSL_VIT, SSL_TINY, SSL_HEAD
B, N_LOCAL, SG, SL = 3, 2, 4, 2
NG, NL = 16, 4  # 32-px globals and 16-px locals at patch 8


def pair(**changes):
    torch.manual_seed(0)
    kwargs = {"num_class_tokens": 2, "img_size": 32, "drop_path_rate": 0.0, **HEAD, **TINY}
    kwargs.update(changes)
    return build_pair(VIT, **kwargs)


def one_hot_rows(*lead, s, n, g):
    """Packed one-hot rows with the last row of every block left invalid (all zero)."""
    maps = torch.zeros(*lead, s, n)
    picks = torch.randint(0, n, (*lead, s), generator=g)
    maps.scatter_(-1, picks.unsqueeze(-1), 1.0)
    maps[..., -1, :] = 0.0
    return maps


def bilinear_rows(*lead, s, grid, g):
    """Rows of bilinear weights over a 2×2 neighbourhood of a grid×grid map; last row invalid."""
    maps = torch.zeros(*lead, s, grid, grid)
    flat = maps.view(-1, s, grid, grid)
    for block in flat:
        for row in block[:-1]:
            i, j = (int(v) for v in torch.randint(0, grid - 1, (2,), generator=g))
            w = torch.rand(4, generator=g)
            row[i:i + 2, j:j + 2] = (w / w.sum()).view(2, 2)
    return maps.flatten(-2)


def make_batch(n_local=N_LOCAL, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "globals": torch.randn(2, B, 3, 32, 32, generator=g),
        "locals": torch.randn(n_local, B, 3, 16, 16, generator=g),
        "src_global": one_hot_rows(2, B, s=SG, n=NG, g=g),
        "tgt_global": bilinear_rows(2, B, s=SG, grid=4, g=g),
        "src_local": one_hot_rows(2, n_local, B, s=SL, n=NL, g=g),
        "tgt_local": bilinear_rows(2, n_local, B, s=SL, grid=4, g=g),
    }


# -- vit_tokens -------------------------------------------------------------------------------

def test_two_class_token_vit_shapes_at_two_sizes():
    vit = create_vit(VIT, img_size=32, **TINY)
    assert class_token_count(vit) == 2
    x = torch.randn(2, 3, 32, 32)
    assert last_tokens(vit, x).shape == (2, 2 + NG, 48)
    assert last_tokens(vit, torch.randn(2, 3, 16, 16)).shape == (2, 2 + NL, 48)
    assert last_attention(vit, torch.randn(2, 3, 16, 16)).shape == (2, 3, 2 + NL, 2 + NL)
    # class tokens re-initialised at std 0.02, not timm's 1e-6
    assert 0.005 < vit.cls_token.std() < 0.05 and 0.005 < vit.reg_token.std() < 0.05
    assert (vit.cls_token - vit.reg_token).abs().max() > 1e-3
    # the tokens are what forward_features gives before its final norm
    torch.testing.assert_close(vit.norm(last_tokens(vit, x)), vit.forward_features(x))
    dino = create_vit(VIT, num_class_tokens=1, img_size=32, **TINY)
    assert class_token_count(dino) == 1 and last_tokens(dino, x).shape == (2, 1 + NG, 48)


def test_pos_embed_class_rows_unchanged_under_resampling():
    vit = create_vit(VIT, img_size=32, **TINY)
    with torch.no_grad():
        vit.cls_token.zero_()
        vit.reg_token.zero_()
    for grid in (4, 2, 6):
        embedded = vit._pos_embed(torch.zeros(1, grid, grid, 48))  # = the resampled pos_embed
        assert embedded.shape == (1, 2 + grid * grid, 48)
        torch.testing.assert_close(embedded[:, :2], vit.pos_embed[:, :2], rtol=0, atol=0)
        if grid == 4:
            torch.testing.assert_close(embedded, vit.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_last_attention_matches_timm_unfused_attention(qk_norm):
    vit = create_vit(VIT, img_size=32, qk_norm=qk_norm, **TINY).eval()
    if qk_norm:
        with torch.no_grad():
            vit.blocks[-1].attn.q_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("p", o))
    vit.forward_features(x)
    probs = last_attention(vit, x)
    torch.testing.assert_close(probs, captured["p"])
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 2 + NG))


def test_intermediate_class_tokens_end_with_the_final_ones():
    vit = create_vit(VIT, img_size=32, **TINY)
    x = torch.randn(2, 3, 32, 32)
    inter = intermediate_class_tokens(vit, x, 2)
    assert inter.shape == (2, 2, 2, 48)
    torch.testing.assert_close(inter[-1], vit.norm(last_tokens(vit, x))[:, :2])
    with pytest.raises(UserError):
        intermediate_class_tokens(vit, x, 3)


@pytest.mark.parametrize("name", ["resnet18", "vit_base_patch16_reg4_gap_256",
                                  "deit3_small_patch16_224", "no_such_model"])
def test_create_vit_refuses_other_models(name):
    with pytest.raises(UserError):
        create_vit(name, img_size=32, patch_size=8, depth=1)


# -- SRS attention ------------------------------------------------------------------------------

def naive_srs(srs: SRSAttention, tokens: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """SRS for one map row against tokens [N, D], written out per head."""
    d = tokens.shape[-1]
    h, dh = srs.heads, d // srs.heads
    wq, wk, wv = srs.qkv.weight.split(d)
    bq, bk, bv = srs.qkv.bias.split(d)
    point = row @ tokens
    query = row @ (tokens @ wq.T + bq)
    keys, values = tokens @ wk.T + bk, tokens @ wv.T + bv
    heads = []
    for i in range(h):
        part = slice(i * dh, (i + 1) * dh)
        weights = torch.softmax(keys[:, part] @ query[part] / dh ** 0.5, dim=0)
        heads.append(weights @ values[:, part])
    out = srs.proj(torch.cat(heads)) + point
    return F.layer_norm(out, (d,), srs.norm.weight, srs.norm.bias, eps=1e-6)


@pytest.mark.parametrize("kind", ["one_hot", "bilinear"])
def test_srs_matches_a_naive_loop(kind):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    srs = SRSAttention(48, 3)
    with torch.no_grad():  # non-trivial norm and biases
        for p in srs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randn(2, B, NG, 48)
    if kind == "one_hot":
        maps = one_hot_rows(2, N_LOCAL, B, s=SG, n=NG, g=g)
    else:
        maps = bilinear_rows(2, N_LOCAL, B, s=SG, grid=4, g=g)
    out = srs(tokens[:, None], maps)
    assert out.shape == (2, N_LOCAL, B, SG, 48)
    assert torch.isfinite(out).all()
    for v in range(2):
        for k in range(N_LOCAL):
            for b in range(B):
                for r in range(SG - 1):  # the last row is invalid
                    expected = naive_srs(srs, tokens[v, b], maps[v, k, b, r])
                    torch.testing.assert_close(out[v, k, b, r], expected, atol=1e-5, rtol=1e-4)


def test_srs_width_and_heads_come_from_the_backbone():
    for dim, heads in ((48, 3), (96, 6)):
        student, _ = pair(embed_dim=dim, num_heads=heads)
        assert student.srs.heads == heads and student.srs.qkv.in_features == dim
        assert student.norm1.normalized_shape == (dim,)
    student, _ = pair(embed_dim=96, num_heads=6, srs_heads=3)
    assert student.srs.heads == 3
    with pytest.raises(UserError):
        pair(srs_heads=5)


# -- head ---------------------------------------------------------------------------------------

def test_dino_head_is_weight_normalised_with_frozen_magnitude():
    torch.manual_seed(0)
    head = DINOHead(48, 64, hidden=64, bottleneck=32, layers=3)
    assert [k for k in head.state_dict() if k.startswith("last_layer")] == [
        "last_layer.weight_v", "last_layer.weight_g"]
    assert not head.last_layer.weight_g.requires_grad
    assert torch.equal(head.last_layer.weight_g, torch.ones(64, 1))
    assert all(float(m.bias.detach().abs().max()) == 0 for m in head.mlp if isinstance(m, nn.Linear))
    # against torch's own weight norm, with a magnitude that is not 1
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(32, 64, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(5, 7, 48)
    hidden = F.normalize(head.mlp(x.reshape(-1, 48)), dim=-1)
    torch.testing.assert_close(head(x), ref(hidden).reshape(5, 7, 64))
    assert DINOHead(48, 64, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert isinstance(DINOHead(48, 64, layers=1).mlp, nn.Linear)


def test_one_head_serves_all_levels():
    student, _ = pair()
    fresh = DINOHead(48, **{"out_dim": 64, "hidden": 64, "bottleneck": 32})
    head_params = [n for n, _ in student.named_parameters() if n.startswith("head.")]
    assert len(head_params) == len(list(fresh.parameters()))
    batch = make_batch()
    out = student.forward_student(batch)
    # patch logits are the head applied to the SRS output; cls logits the head on the class token
    grads = torch.autograd.grad(out.patch_global.logits.sum(), student.head.mlp[0].weight,
                                retain_graph=True)  # one head call serves every level
    assert grads[0].abs().sum() > 0
    grads = torch.autograd.grad(out.plus_global.sum(), student.head.mlp[0].weight)
    assert grads[0].abs().sum() > 0


# -- student and teacher ------------------------------------------------------------------------

def on_valid(logits: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The head's output where a map row samples a point; 0 on the padding rows (the model
    skips them)."""
    valid = (maps.abs().sum(-1) > 0)[..., None]
    assert valid.any() and not valid.all()  # both kinds of rows are checked
    return torch.where(valid, logits, torch.zeros(()))


def count_backbone_runs(model: UDIModel) -> list[int]:
    calls = [0]
    model.backbone.patch_embed.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_teacher_runs_the_backbone_once_and_pairs_views():
    student, teacher = pair()
    calls = count_backbone_runs(teacher)
    batch = make_batch()
    with torch.no_grad():
        out = teacher.forward_teacher(batch)
    assert calls[0] == 1
    assert out.cls.shape == (2, B, 64) and out.patch_global.logits.shape == (2, B, SG, 64)
    assert out.patch_local.logits.shape == (2, N_LOCAL, B, SL, 64)
    assert out.patch_global.mask.dtype == torch.bool
    assert out.patch_global.mask[..., :-1].all() and not out.patch_global.mask[..., -1].any()
    assert out.patch_local.mask.shape == (2, N_LOCAL, B, SL)
    # independent recomputation: per view, tokens → LN_1 → SRS on the right view → head
    with torch.no_grad():
        patches = [teacher.norm1(last_tokens(teacher.backbone, batch["globals"][v])[:, 2:])
                   for v in range(2)]
        cls = [teacher.head(teacher.backbone.norm(last_tokens(teacher.backbone,
                                                              batch["globals"][v]))[:, 0])
               for v in range(2)]
        for u in range(2):
            torch.testing.assert_close(out.cls[u], cls[u], atol=1e-5, rtol=1e-4)
            expect = on_valid(teacher.head(teacher.srs(patches[1 - u], batch["tgt_global"][u])),
                              batch["tgt_global"][u])
            torch.testing.assert_close(out.patch_global.logits[u], expect, atol=1e-5, rtol=1e-4)
            for k in range(N_LOCAL):
                expect = on_valid(teacher.head(teacher.srs(patches[u], batch["tgt_local"][u, k])),
                                  batch["tgt_local"][u, k])
                torch.testing.assert_close(out.patch_local.logits[u, k], expect, atol=1e-5, rtol=1e-4)
    # changing view 1 only changes the predictions made from view 1's tokens
    changed = dict(batch, globals=batch["globals"].clone())
    changed["globals"][1] += 1.0
    with torch.no_grad():
        other = teacher.forward_teacher(changed)
    torch.testing.assert_close(other.patch_global.logits[1], out.patch_global.logits[1])
    torch.testing.assert_close(other.patch_local.logits[0], out.patch_local.logits[0])
    assert not torch.allclose(other.patch_global.logits[0], out.patch_global.logits[0])
    assert not torch.allclose(other.patch_local.logits[1], out.patch_local.logits[1])


def test_student_outputs_and_local_srs_switch():
    student, _ = pair()
    srs_calls = [0]
    student.srs.register_forward_hook(lambda *a: srs_calls.__setitem__(0, srs_calls[0] + 1))
    runs = count_backbone_runs(student)
    batch = make_batch()
    out = student(batch)
    assert runs[0] == 2 and srs_calls[0] == 1
    assert out.cls_global.shape == (2, B, 64) and out.plus_global.shape == (2, B, 64)
    assert out.cls_local.shape == (N_LOCAL, B, 64) and out.plus_local.shape == (N_LOCAL, B, 64)
    assert out.patch_global.logits.shape == (2, B, SG, 64) and out.patch_local is None
    torch.testing.assert_close(out.patch_global.mask, batch["src_global"].sum(-1) > 0)
    # the student's patch u comes from its own view u
    with torch.no_grad():
        z = student.norm1(last_tokens(student.backbone, batch["globals"][1])[:, 2:])
        torch.testing.assert_close(out.patch_global.logits[1],
                                   on_valid(student.head(student.srs(z, batch["src_global"][1])),
                                            batch["src_global"][1]),
                                   atol=1e-5, rtol=1e-4)
        local = last_tokens(student.backbone, batch["locals"][1])
        torch.testing.assert_close(out.cls_local[1], student.head(student.backbone.norm(local)[:, 0]),
                                   atol=1e-5, rtol=1e-4)
    with_local, _ = pair(local_patch=True)
    out = with_local(batch)
    assert out.patch_local.logits.shape == (2, N_LOCAL, B, SL, 64)
    assert out.patch_local.mask.shape == (2, N_LOCAL, B, SL)
    with torch.no_grad():
        z = with_local.norm1(last_tokens(with_local.backbone, batch["locals"][0])[:, 2:])
        torch.testing.assert_close(out.patch_local.logits[1, 0],
                                   on_valid(with_local.head(with_local.srs(
                                       z, batch["src_local"][1, 0])), batch["src_local"][1, 0]),
                                   atol=1e-5, rtol=1e-4)


def test_no_local_crops():
    student, teacher = pair()
    runs = count_backbone_runs(student)
    batch = make_batch(n_local=0)
    out = student(batch)
    assert runs[0] == 1
    assert out.cls_local.shape == (0, B, 64) and out.plus_local.shape == (0, B, 64)
    with torch.no_grad():
        t = teacher.forward_teacher(batch)
    assert t.patch_local.logits.shape == (2, 0, B, SL, 64)


def test_dino_mode_has_no_patch_modules():
    student, teacher = pair(num_class_tokens=1, patch_level=False)
    assert student.srs is None and student.norm1 is None
    names = [n for n, _ in student.named_parameters()]
    assert not any(n.startswith(("srs.", "norm1.")) for n in names)
    out = student(make_batch())
    assert out.plus_global is None and out.patch_global is None and out.plus_local is None
    with torch.no_grad():
        t = teacher.forward_teacher(make_batch())
    assert t.patch_global is None and t.patch_local is None
    with pytest.raises(UserError):
        pair(num_class_tokens=2, patch_level=False)
    with pytest.raises(UserError):
        pair(num_class_tokens=1, patch_level=False, local_patch=True)


def test_build_pair_teacher_is_a_frozen_copy_and_state_dicts_round_trip():
    student, teacher = pair(drop_path_rate=0.2)
    assert not any(p.requires_grad for p in teacher.parameters())
    for key, value in student.state_dict().items():
        assert torch.equal(value, teacher.state_dict()[key])
    kinds = {type(m).__name__ for m in student.backbone.modules()}
    assert "DropPath" in kinds
    assert "DropPath" not in {type(m).__name__ for m in teacher.backbone.modules()}
    # round trip into a differently seeded model
    torch.manual_seed(123)
    other, _ = build_pair(VIT, num_class_tokens=2, img_size=32, drop_path_rate=0.0, **HEAD, **TINY)
    other.load_state_dict(teacher.state_dict(), strict=True)
    batch = make_batch()
    with torch.no_grad():
        a, b = teacher.forward_teacher(batch), other.forward_teacher(batch)
    torch.testing.assert_close(a.patch_local.logits, b.patch_local.logits)
    torch.testing.assert_close(a.cls, b.cls)


def test_features():
    student, _ = pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        found = student.backbone_features(x)
        normed = student.backbone.norm(last_tokens(student.backbone, x))
        torch.testing.assert_close(found["plus"], normed[:, 1])
        assert found["patches"].shape == (2, NG, 48)
        assert student.features(x, "cls+avgpool").shape == (2, 96)
        torch.testing.assert_close(student.features(x, "plus"), normed[:, 1])
    with pytest.raises(UserError):
        student.features(x, "nope")


def test_vit_small_parameter_counts_match_the_spec():
    """Spec §1.1–1.3: ViT-S/16 with 2 class tokens 21,666,432; SRS + LN_1 592,896; head MLP
    5,509,376 plus K·256 (v) plus K (g)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = UDIModel(create_vit("vit_small_patch16_224"), out_dim=256)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(model.backbone) == 21_666_432
    assert count(model.srs) + count(model.norm1) == 592_896
    assert count(model.head) == 5_509_376 + 256 * 256 + 256
