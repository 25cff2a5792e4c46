"""UDILoss (spec §5, §11.4) against independent re-implementations and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from narrows.errors import UserError
from narrows.ssl.loss import Patches, StudentOutput, TeacherOutput, UDILoss

TAU_S = 0.1


def packed_mask(shape: tuple[int, ...], length: int, gen: torch.Generator) -> torch.Tensor:
    """Random packed validity masks [*shape, length]: a random count of True rows at the top."""
    counts = torch.randint(0, length + 1, shape, generator=gen)
    return torch.arange(length) < counts.unsqueeze(-1)


def make_outputs(B: int = 3, n: int = 2, Sg: int = 4, Sl: int = 3, K: int = 16, seed: int = 0,
                 scale: float = 3.0, local_patch: bool = False,
                 two_tokens: bool = True) -> tuple[StudentOutput, TeacherOutput]:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen)

    student = StudentOutput(
        cls_global=r(2, B, K), cls_local=r(n, B, K),
        plus_global=r(2, B, K) if two_tokens else None,
        plus_local=r(n, B, K) if two_tokens else None,
        patch_global=Patches(r(2, B, Sg, K), packed_mask((2, B), Sg, gen)))
    teacher = TeacherOutput(
        cls=r(2, B, K), patch_global=Patches(r(2, B, Sg, K), student.patch_global.mask.clone()),
        patch_local=Patches(r(2, n, B, Sl, K), packed_mask((2, n, B), Sl, gen)))
    if local_patch:
        student.patch_local = Patches(r(2, n, B, Sl, K), teacher.patch_local.mask.clone())
    return student, teacher


# ---- an independent DINO loss (facebookresearch/dino's formulation) ---------------------------

class ReferenceDINO:
    def __init__(self, K: int, momentum: float = 0.9) -> None:
        self.center = torch.zeros(1, K)
        self.momentum = momentum

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor, ncrops: int,
                 temp: float) -> torch.Tensor:
        s_chunks = (student_out / TAU_S).chunk(ncrops)
        t_chunks = F.softmax((teacher_out - self.center) / temp, dim=-1).chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(t_chunks):
            for v in range(len(s_chunks)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s_chunks[v], dim=-1), dim=-1).mean()
                terms += 1
        self.center = self.center * self.momentum + teacher_out.mean(0, keepdim=True) * (
            1 - self.momentum)
        return total / terms


@pytest.mark.parametrize("n", [0, 3])
def test_dino_mode_equals_independent_dino_loss(n: int) -> None:
    B, K, temp = 4, 32, 0.04
    loss = UDILoss(K, num_class_tokens=1, patch_level=False).double()
    ref = ReferenceDINO(K)
    gen = torch.Generator().manual_seed(n)
    for step in range(2):  # the second step runs with the centre the first step left behind
        s_g = 2 * torch.randn(2, B, K, generator=gen, dtype=torch.float64)
        s_l = 2 * torch.randn(n, B, K, generator=gen, dtype=torch.float64)
        t = 2 * torch.randn(2, B, K, generator=gen, dtype=torch.float64)
        out = loss(StudentOutput(cls_global=s_g, cls_local=s_l), TeacherOutput(cls=t), temp)
        expected = ref(torch.cat([s_g.reshape(-1, K), s_l.reshape(-1, K)]), t.reshape(-1, K),
                       2 + n, temp)
        assert float(out.total) == pytest.approx(float(expected), abs=1e-6), step
        assert torch.allclose(loss.center, ref.center, atol=1e-6)
        assert set(out.terms) == {"g_cl", "entropy_cls"} | ({"l_cl"} if n else set())


# ---- UDI against a brute-force loop over (student crop, teacher view) pairs -------------------

def brute_force(student: StudentOutput, teacher: TeacherOutput, center: torch.Tensor,
                temp: float, alpha: float, local_patch: bool = False) -> dict[str, float]:
    """Every pair and sample visited in Python loops; levels = mean over all 2 + 2n pairs."""
    n, B = student.cls_local.shape[:2]
    c0, c1, c2 = center

    def H(p: torch.Tensor, s: torch.Tensor) -> float:
        return float(-(p * F.log_softmax(s / TAU_S, dim=-1)).sum())

    def P(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.softmax((x - c) / temp, dim=-1)

    def blend(patches: torch.Tensor, mask: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        acc, count = torch.zeros_like(cls), 0
        for i in range(len(mask)):
            if mask[i]:
                acc, count = acc + patches[i], count + 1
        return alpha * acc / (count + 1e-5) + (1 - alpha) * cls

    cls_pairs, plus_pairs, g_cls, g_plus, l_cls, l_plus = [], [], [], [], [], []
    for u in range(2):  # global crop u against teacher view 1 - u
        v = 1 - u
        pc = sum(H(P(teacher.cls[v, b], c0), student.cls_global[u, b]) for b in range(B)) / B
        tg = teacher.patch_global
        pp = sum(H(P(blend(tg.logits[u, b], tg.mask[u, b],
                           teacher.cls[v, b]), c1), student.plus_global[u, b])
                 for b in range(B)) / B
        cls_pairs.append(pc), plus_pairs.append(pp), g_cls.append(pc), g_plus.append(pp)
    for k in range(n):
        for v in range(2):
            pc = sum(H(P(teacher.cls[v, b], c0), student.cls_local[k, b]) for b in range(B)) / B
            tl = teacher.patch_local
            pp = sum(H(P(blend(tl.logits[v, k, b], tl.mask[v, k, b],
                               teacher.cls[v, b]), c1), student.plus_local[k, b])
                     for b in range(B)) / B
            cls_pairs.append(pc), plus_pairs.append(pp), l_cls.append(pc), l_plus.append(pp)
    g_samples = [H(P(teacher.patch_global.logits[u, b, i], c2),
                   student.patch_global.logits[u, b, i])
                 for u in range(2) for b in range(B)
                 for i in range(student.patch_global.mask.shape[-1])
                 if student.patch_global.mask[u, b, i]]
    result = {"cls": sum(cls_pairs) / len(cls_pairs), "plus": sum(plus_pairs) / len(plus_pairs),
              "g_cl": sum(g_cls) / 2, "g_mcl": sum(g_plus) / 2,
              "g_pch": sum(g_samples) / max(len(g_samples), 1)}
    if n:
        result["l_cl"] = sum(l_cls) / (2 * n)
        result["l_mcl"] = sum(l_plus) / (2 * n)
    result["patch"] = result["g_pch"]
    if local_patch and n:
        l_samples = [H(P(teacher.patch_local.logits[v, k, b, i], c2),
                       student.patch_local.logits[v, k, b, i])
                     for v in range(2) for k in range(n) for b in range(B)
                     for i in range(student.patch_local.mask.shape[-1])
                     if student.patch_local.mask[v, k, b, i]]
        result["l_pch"] = sum(l_samples) / max(len(l_samples), 1)
        result["patch"] = (2 * result["g_pch"] + 2 * n * result["l_pch"]) / (2 + 2 * n)
    result["total"] = (result["cls"] + result["plus"] + result["patch"]) / 3
    return result


@pytest.mark.parametrize("n,local_patch", [(0, False), (2, False), (3, True)])
def test_udi_matches_brute_force_pairs(n: int, local_patch: bool) -> None:
    student, teacher = make_outputs(n=n, seed=10 + n, local_patch=local_patch)
    loss = UDILoss(16, alpha=0.3, local_patch=local_patch)
    loss.center.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
    expected = brute_force(student, teacher, loss.center.clone(), 0.05, 0.3, local_patch)
    out = loss(student, teacher, 0.05)
    assert float(out.total) == pytest.approx(expected["total"], rel=1e-5)
    for name, value in out.terms.items():
        if name != "entropy_cls":
            assert float(value) == pytest.approx(expected[name], rel=1e-5), name
    # the level weighting itself: (2g + 2n·l)/(2 + 2n) equals the mean over the pairs
    if n:
        assert (2 * expected["g_cl"] + 2 * n * expected["l_cl"]) / (2 + 2 * n) == \
            pytest.approx(expected["cls"], rel=1e-9)
    terms = {"g_cl", "g_mcl", "g_pch", "entropy_cls"} | ({"l_cl", "l_mcl"} if n else set())
    assert set(out.terms) == terms | ({"l_pch"} if local_patch else set())


def test_one_token_with_patch_level_has_two_levels() -> None:
    student, teacher = make_outputs(seed=3, two_tokens=False)
    loss = UDILoss(16, num_class_tokens=1)
    assert loss.center.shape == (2, 16)
    center = torch.zeros(3, 16)
    ref = brute_force(StudentOutput(**{**student.__dict__, "plus_global": student.cls_global,
                                       "plus_local": student.cls_local}),
                      teacher, center, 0.04, 0.5)
    out = loss(student, teacher, 0.04)
    assert float(out.total) == pytest.approx((ref["cls"] + ref["patch"]) / 2, rel=1e-5)
    assert "g_mcl" not in out.terms


def test_alpha_zero_makes_plus_target_the_cls_target() -> None:
    student, teacher = make_outputs(n=2, seed=4)
    student.plus_global, student.plus_local = student.cls_global, student.cls_local
    loss = UDILoss(16, alpha=0.0)
    for _ in range(2):  # also after a centre update: c_1 then equals c_0
        out = loss(student, teacher, 0.04)
        assert torch.allclose(out.terms["g_mcl"], out.terms["g_cl"], rtol=1e-6)
        assert torch.allclose(out.terms["l_mcl"], out.terms["l_cl"], rtol=1e-6)
    assert torch.allclose(loss.center[1], loss.center[0], atol=1e-6)


def test_invalid_patch_slots_change_nothing_and_all_invalid_is_finite() -> None:
    student, teacher = make_outputs(n=2, seed=5, local_patch=True)
    base = UDILoss(16, local_patch=True)(student, teacher, 0.04)
    for mask, logits in ((student.patch_global.mask, student.patch_global.logits),
                         (teacher.patch_global.mask, teacher.patch_global.logits),
                         (teacher.patch_local.mask, teacher.patch_local.logits),
                         (student.patch_local.mask, student.patch_local.logits)):
        logits[~mask] = float("nan")
    student.patch_global.logits.requires_grad_(True)
    loss = UDILoss(16, local_patch=True)
    out = loss(student, teacher, 0.04)
    assert torch.allclose(out.total, base.total, rtol=1e-6)
    for name in base.terms:
        assert torch.allclose(out.terms[name], base.terms[name], rtol=1e-6), name
    out.total.backward()
    assert torch.isfinite(student.patch_global.logits.grad).all()
    assert torch.isfinite(loss.center).all()
    # no valid sample anywhere: finite loss, zero patch term, c_2 keeps its value
    for mask in (student.patch_global.mask, teacher.patch_global.mask, teacher.patch_local.mask,
                 student.patch_local.mask):
        mask.zero_()
    loss = UDILoss(16, local_patch=True)
    loss.center[2] = 1.5
    out = loss(student, teacher, 0.04)
    assert torch.isfinite(out.total) and float(out.terms["g_pch"]) == 0.0
    assert torch.allclose(loss.center[2], torch.full((16,), 1.5))


def test_centres_move_after_the_loss() -> None:
    student, teacher = make_outputs(n=2, seed=6)
    loss = UDILoss(16)
    first = loss(student, teacher, 0.04)
    assert float(loss.center.abs().sum()) > 0
    fresh = UDILoss(16)  # centre still zero: the first call used a zero centre
    assert torch.allclose(fresh(student, teacher, 0.04).total, first.total)
    frozen = UDILoss(16)
    frozen.center.copy_(loss.center)
    second = loss(student, teacher, 0.04)
    assert torch.allclose(frozen(student, teacher, 0.04).total, second.total)
    assert not torch.allclose(first.total, second.total)


def test_centres_fed_as_spec_on_a_tiny_case() -> None:
    K, a = 3, 0.5
    gen = torch.Generator().manual_seed(7)
    tc = torch.randn(2, 1, K, generator=gen)
    tpg = torch.randn(2, 1, 2, K, generator=gen)
    tpl = torch.randn(2, 1, 1, 2, K, generator=gen)
    mg = torch.tensor([[[True, False]], [[True, True]]])
    ml = torch.tensor([[[[True, False]]], [[[False, False]]]])
    tpg[0, 0, 1] = 1e6  # invalid slots must not count anywhere
    tpl[0, 0, 0, 1] = tpl[1, 0, 0, 0] = tpl[1, 0, 0, 1] = -1e6
    student = StudentOutput(cls_global=torch.randn(2, 1, K), cls_local=torch.randn(1, 1, K),
                            plus_global=torch.randn(2, 1, K), plus_local=torch.randn(1, 1, K),
                            patch_global=Patches(torch.randn(2, 1, 2, K), mg))
    teacher = TeacherOutput(cls=tc, patch_global=Patches(tpg, mg), patch_local=Patches(tpl, ml))
    loss = UDILoss(K, alpha=a)
    loss(student, teacher, 0.04)
    e = 1e-5
    c0 = (tc[0, 0] + tc[1, 0]) / 2
    blends = [a * tpg[0, 0, 0] / (1 + e) + (1 - a) * tc[1, 0],          # global A vs view B
              a * (tpg[1, 0, 0] + tpg[1, 0, 1]) / (2 + e) + (1 - a) * tc[0, 0],  # B vs A
              a * tpl[0, 0, 0, 0] / (1 + e) + (1 - a) * tc[0, 0],        # local vs view A
              (1 - a) * tc[1, 0]]                                         # local vs B: none valid
    c1 = sum(blends) / 4
    c2 = (tpg[0, 0, 0] + tpg[1, 0, 0] + tpg[1, 0, 1] + tpl[0, 0, 0, 0]) / 4
    assert torch.allclose(loss.center, 0.1 * torch.stack([c0, c1, c2]), atol=1e-6)


def test_prob_mixture_is_its_definition_and_differs_from_logit_mean() -> None:
    student, teacher = make_outputs(n=0, seed=8)
    teacher.patch_global.mask[0, 0] = False  # one crop without valid samples: target = P_cls
    a, temp = 0.4, 0.05
    center = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    mix = UDILoss(16, alpha=a, plus_target="prob_mixture")
    mix.center.copy_(center)
    out = mix(student, teacher, temp)
    total, B = 0.0, teacher.cls.shape[1]
    for u in range(2):
        for b in range(B):
            p_cls = F.softmax((teacher.cls[1 - u, b] - center[0]) / temp, dim=-1)
            valid = teacher.patch_global.logits[u, b][teacher.patch_global.mask[u, b]]
            if len(valid):
                p_patch = F.softmax((valid - center[2]) / temp, dim=-1).mean(0)
                target = a * p_patch + (1 - a) * p_cls
            else:
                target = p_cls
            total += float(-(target * F.log_softmax(student.plus_global[u, b] / TAU_S, -1)).sum())
    assert float(out.terms["g_mcl"]) == pytest.approx(total / (2 * B), rel=1e-5)
    blend = UDILoss(16, alpha=a)
    blend.center.copy_(center)
    other = blend(student, teacher, temp)
    assert abs(float(other.terms["g_mcl"]) - float(out.terms["g_mcl"])) > 1e-3
    assert torch.allclose(other.terms["g_cl"], out.terms["g_cl"])


def test_initial_loss_near_ln_k() -> None:
    K = 256
    student, teacher = make_outputs(B=4, n=2, K=K, seed=9, scale=1e-3)
    out = UDILoss(K)(student, teacher, 0.04)
    for name, value in out.terms.items():
        assert float(value) == pytest.approx(math.log(K), abs=0.02), name
    assert float(out.total) == pytest.approx(math.log(K), abs=0.02)


def test_gloo_world_of_one_gives_the_same_centre(tmp_path) -> None:
    import torch.distributed as dist

    student, teacher = make_outputs(n=2, seed=11)
    local = UDILoss(16)
    local(student, teacher, 0.04)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        shared = UDILoss(16)
        shared(student, teacher, 0.04)
    finally:
        dist.destroy_process_group()
    assert torch.allclose(shared.center, local.center)


def test_bad_configurations_are_user_errors() -> None:
    with pytest.raises(UserError, match="patch level"):
        UDILoss(16, num_class_tokens=2, patch_level=False)
    with pytest.raises(UserError):
        UDILoss(16, num_class_tokens=3)
    with pytest.raises(UserError):
        UDILoss(16, plus_target="mixture")  # type: ignore[arg-type]
    with pytest.raises(UserError):
        UDILoss(16, num_class_tokens=1, patch_level=False, local_patch=True)


def test_half_precision_inputs_are_handled_in_float32() -> None:
    student, teacher = make_outputs(n=2, seed=12)
    ref = UDILoss(16)(student, teacher, 0.04)
    def bf16(v):
        if isinstance(v, Patches):
            return Patches(v.logits.bfloat16(), v.mask)
        return v.bfloat16() if v is not None else v

    half = StudentOutput(**{k: bf16(v) for k, v in student.__dict__.items()})
    out = UDILoss(16)(half, teacher, 0.04)
    assert out.total.dtype == torch.float32
    assert float(out.total) == pytest.approx(float(ref.total), rel=2e-2)
