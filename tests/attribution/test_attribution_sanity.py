"""Cascading randomisation: SSIM and Spearman in closed form, the check itself, the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from torch import nn

from narrows.attribution.metrics import (
    RandomisationResult,
    cascade_layers,
    cascading_randomisation,
    minmax_normalise,
    spearman,
    ssim,
)
from narrows.attribution.metrics.randomisation import rank_average, reinitialise
from narrows.cli import main
from narrows.errors import UserError

C1, C2 = 0.01**2, 0.03**2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_taps(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    k = np.arange(size) - (size - 1) / 2
    g = np.exp(-(k**2) / (2 * sigma**2))
    return g / g.sum()


# -- Spearman ----------------------------------------------------------------------------------

def test_ranks_and_spearman_match_scipy_with_ties():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 6, 7), generator=gen).double()  # many ties
    b = a + torch.randint(0, 3, (3, 6, 7), generator=gen)
    assert np.allclose(rank_average(a.flatten(1)), [scipy_stats.rankdata(r) for r in a.flatten(1)])
    expected = [scipy_stats.spearmanr(x.flatten(), y.flatten()).statistic for x, y in zip(a, b, strict=True)]
    assert np.allclose(spearman(a, b), expected)
    assert float(spearman(a[0], a[0])[0]) == pytest.approx(1.0)
    assert float(spearman(a[0], -a[0])[0]) == pytest.approx(-1.0)
    assert torch.isnan(spearman(torch.ones(4, 4), a[0, :4, :4])).all()  # constant map


def test_minmax_normalise():
    maps = torch.stack([torch.arange(12.0).view(3, 4) - 3, torch.full((3, 4), 2.0)])
    out = minmax_normalise(maps)
    assert float(out[0].min()) == 0 and float(out[0].max()) == 1
    assert torch.equal(out[1], torch.zeros(3, 4, dtype=torch.float64))


# -- SSIM --------------------------------------------------------------------------------------

def test_ssim_identical_is_one_and_symmetric():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 20, 17, generator=gen), torch.rand(3, 20, 17, generator=gen)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ssim(a, b), ssim(b, a))
    assert (ssim(a, b) < 0.5).all()
    small = torch.rand(6, 8, generator=gen)  # smaller than the 11×11 window
    assert float(ssim(small, small)[0]) == pytest.approx(1.0)


def test_ssim_constants_closed_form():
    a, b = 0.3, 0.8
    value = ssim(torch.full((12, 12), a), torch.full((12, 12), b))
    assert float(value[0]) == pytest.approx((2 * a * b + C1) / (a**2 + b**2 + C1))


def test_ssim_constant_against_ramp_by_hand():
    """x = c, y = s·column: σx = σxy = 0, μy = s·j at window centre j, σy² = s²·Σ g_k k²."""
    c, s, h, w = 0.5, 0.05, 12, 15
    x = torch.full((h, w), c)
    y = (s * torch.arange(w, dtype=torch.float64)).expand(h, w)
    g = gaussian_taps()
    var_y = s**2 * float((g * (np.arange(11) - 5) ** 2).sum())
    centres = np.arange(5, w - 5)
    mu = s * centres
    per_column = (2 * c * mu + C1) * C2 / ((c**2 + mu**2 + C1) * (var_y + C2))
    assert float(ssim(x, y)[0]) == pytest.approx(per_column.mean(), rel=1e-9)


def test_ssim_matches_direct_windowed_formula():
    rng = np.random.default_rng(2)
    a, b = rng.random((13, 14)), rng.random((13, 14))
    g = gaussian_taps()
    window = np.outer(g, g)
    values = []
    for i in range(13 - 10):
        for j in range(14 - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * (pa - mu_a) ** 2).sum()
            var_b = (window * (pb - mu_b) ** 2).sum()
            cov = (window * (pa - mu_a) * (pb - mu_b)).sum()
            values.append((2 * mu_a * mu_b + C1) * (2 * cov + C2)
                          / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2)))
    got = ssim(torch.from_numpy(a), torch.from_numpy(b))
    assert float(got[0]) == pytest.approx(float(np.mean(values)), rel=1e-10)


# -- the randomisation check -------------------------------------------------------------------

class SmallCNN(nn.Module):
    """The head is defined before the body, but runs after it; ``act`` has no parameters;
    ``unused`` is never called."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(16 * 4 * 4, classes)
        self.unused = nn.Linear(2, 2)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv1(x)))
        x = F.adaptive_avg_pool2d(self.act(self.conv2(x)), 4)
        return self.head(x.flatten(1))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 20, 20, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def saliency(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).gather(1, t[:, None]).sum(), x)
    return grad.abs().amax(dim=1)


def noisy_saliency(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Saliency plus noise from the global RNG, as a stochastic method (IBA) draws it."""
    maps = saliency(model, x, t)
    return maps + 0.3 * maps.std() * torch.randn_like(maps)


def edges(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An edge detector: reads the input only, never the model."""
    sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]])
    grey = x.mean(dim=1, keepdim=True)
    gx = F.conv2d(grey, sobel.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(grey, sobel.T.reshape(1, 1, 3, 3), padding=1)
    return (gx.square() + gy.square()).sqrt()[:, 0]


def test_default_layers_follow_the_forward_order():
    net = small_cnn().train()
    x, _ = batch(2)
    assert cascade_layers(net, x) == ["head", "conv2", "bn", "conv1"]
    assert net.training and net.bn.training  # modes restored
    assert int(net.bn.num_batches_tracked) == 0  # the ordering pass updated no statistics


def test_reinitialise_is_seeded_and_resets_running_statistics():
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.fill_(3.0)
        bn.running_mean.fill_(2.0)
        bn.running_var.fill_(7.0)
    reinitialise(bn, 0)
    assert torch.equal(bn.weight, torch.ones(5)) and torch.equal(bn.running_mean, torch.zeros(5))
    assert torch.equal(bn.running_var, torch.ones(5))
    first, second = nn.Linear(6, 3), nn.Linear(6, 3)
    reinitialise(first, 7)
    reinitialise(second, 7)
    assert torch.equal(first.weight, second.weight)
    reinitialise(second, 8)
    assert not torch.equal(first.weight, second.weight)

    class Plain(nn.Module):  # no reset_parameters: the entries are permuted
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.arange(10.0))

    plain = Plain()
    assert reinitialise(plain, 0) == ["scale"]
    assert sorted(plain.scale.tolist()) == list(range(10))
    assert plain.scale.tolist() != list(range(10))


def test_callers_model_and_rng_untouched():
    net = small_cnn().train()  # batch statistics would move if the caller's model were used
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    x, t = batch(4)
    cascading_randomisation(net, noisy_saliency, x, t, repeats=2)
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_input_only_method_keeps_rho_one():
    x, t = batch()
    result = cascading_randomisation(small_cnn(), edges, x, t)
    assert result.layers == ["head", "conv2", "bn", "conv1"]
    assert torch.allclose(result.spearman, torch.ones_like(result.spearman))
    assert torch.allclose(result.ssim, torch.ones_like(result.ssim))
    assert torch.allclose(result.baseline_spearman, torch.ones(6, dtype=torch.float64))


def test_saliency_drops_after_randomising_the_top():
    x, t = batch()
    result = cascading_randomisation(small_cnn(), saliency, x, t)
    rows = result.to_rows()
    assert rows[0]["spearman_mean"] == pytest.approx(1.0)  # deterministic: no noise floor
    assert rows[1]["randomised_to"] == "head"
    assert rows[1]["spearman_mean"] < 0.6 and rows[1]["ssim_mean"] < 0.6
    assert all(r["spearman_mean"] < 0.6 for r in rows[1:])


def test_reproducible_with_the_same_seed():
    x, t = batch(4)
    one = cascading_randomisation(small_cnn(), noisy_saliency, x, t, seed=5, repeats=3)
    two = cascading_randomisation(small_cnn(), noisy_saliency, x, t, seed=5, repeats=3)
    other = cascading_randomisation(small_cnn(), noisy_saliency, x, t, seed=6, repeats=3)
    assert torch.equal(one.randomised, two.randomised) and torch.equal(one.ssim, two.ssim)
    assert not torch.equal(one.randomised, other.randomised)
    # the run-to-run noise floor is measured: below 1, above the randomised model's agreement
    floor = float(one.baseline_spearman.mean())
    assert 0.5 < floor < 0.999
    assert float(one.spearman[0].mean()) < floor


def test_explicit_layers_rows_plot_and_round_trip(tmp_path):
    x, t = batch(3)
    result = cascading_randomisation(small_cnn(), saliency, x, t, layers=["head", "conv2"],
                                     repeats=1)
    rows = result.to_rows()
    assert [r["randomised_to"] for r in rows] == ["", "head", "conv2"]
    assert rows[0]["comparison"] == "run-to-run" and np.isnan(rows[0]["spearman_mean"])
    assert result.original.shape == (1, 3, 20, 20) and result.randomised.shape == (2, 3, 20, 20)
    fig, axes = result.plot(label="saliency")
    assert len(fig.axes) == 2 and len(axes) == 2
    result.save(tmp_path / "r.pt")
    loaded = RandomisationResult.load(tmp_path / "r.pt")
    assert loaded.layers == result.layers and torch.equal(loaded.ssim, result.ssim)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": ["nope"]}, "no layer 'nope'"),
    ({"layers": ["act"]}, "has no parameters"),
    ({"layers": []}, "no layers"),
    ({"repeats": 0}, "repeats=0"),
])
def test_mistakes_are_user_errors(kwargs, message):
    x, t = batch(2)
    with pytest.raises(UserError, match=message):
        cascading_randomisation(small_cnn(), saliency, x, t, **kwargs)


def test_wrong_map_shape_is_a_user_error():
    x, t = batch(2)
    with pytest.raises(UserError, match="N×H×W"):
        cascading_randomisation(small_cnn(), lambda m, x, t: torch.zeros(2, 1, 20, 20), x, t)


# -- CLI ---------------------------------------------------------------------------------------

TINY = "shapes:classes=2,size=16,train=16,test=8"


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint) -> str:
    return random_checkpoint(TINY)


@pytest.mark.filterwarnings("ignore:feature statistics from only")
def test_cli_writes_table_and_rerun_is_a_no_op(checkpoint, tmp_path, capsys):
    out = tmp_path / "sanity"
    args = ["attribution", "sanity", "--checkpoint", checkpoint, "--methods", "iba,random",
            "--images", "3", "--steps", "2", "--iba-batch", "2", "--n-samples", "16",
            "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "heatmaps to compute" in printed and "| iba | none (run-to-run) |" in printed
    rows = list(csv.DictReader((out / "sanity.csv").open()))
    layers = ["linear", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert [r["method"] for r in rows] == ["iba"] * 7 + ["random"] * 7
    assert [r["randomised_to"] for r in rows[1:7]] == layers
    assert all(float(r["spearman_mean"]) == pytest.approx(1.0) for r in rows[7:])
    assert (out / "sanity.md").read_text().count("\n") == 2 + 14
    files = ["sanity.csv", "sanity.md", "sanity.png", "sanity_iba.pt", "sanity_random.pt"]
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    assert main(args) == 0  # everything cached: nothing recomputed or rewritten
    assert "(0 to do)" in capsys.readouterr().out
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps


@pytest.mark.parametrize("extra, expected", [
    (["--methods", "iba,nonsense"], "unknown method 'nonsense'"),
    (["--randomise", "linear,bogus"], "no layer 'bogus'"),
])
def test_cli_mistakes_are_one_line_exit_2(checkpoint, tmp_path, capsys, extra, expected):
    args = ["attribution", "sanity", "--checkpoint", checkpoint, "--out", str(tmp_path / "s"),
            "--no-progress", "--threads", "1", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
