"""The multi-order interaction estimator against its definition, on set functions (no model).

The value functions here take bool player masks (B, n) and return v(S) per row, exactly as the
model's value function does, so mask bookkeeping, row order and the Δv sign pattern are the
ones used on images.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from narrows.interactions.estimator import (
    delta_v,
    estimate_image,
    evaluate_blocks,
    order_block,
    pair_rows,
    planned_forwards,
    upstream_forwards,
)
from narrows.interactions.result import InteractionResult
from narrows.interactions.sampling import (
    UPSTREAM_RATIOS,
    order_of,
    sample_contexts,
    sample_pairs,
)


def set_function(fn):
    """Wrap ``fn(frozenset) -> float`` as a value function over bool masks."""

    def value_fn(masks: torch.Tensor) -> torch.Tensor:
        return torch.tensor([fn(frozenset(np.flatnonzero(row.numpy()).tolist())) for row in masks],
                            dtype=torch.float64)

    return value_fn


def random_game(n: int, seed: int):
    table = np.random.default_rng(seed).normal(size=2**n)
    return lambda s: float(table[sum(1 << p for p in s)])


def definition(fn, n: int, i: int, j: int, m: int) -> float:
    """I^(m)(i,j) straight from the definition: the mean of Δv over all C(n−2, m) contexts."""
    rest = [p for p in range(n) if p not in (i, j)]
    total = [fn(frozenset(s) | {i, j}) - fn(frozenset(s) | {i}) - fn(frozenset(s) | {j})
             + fn(frozenset(s)) for s in itertools.combinations(rest, m)]
    return float(np.mean(total))


def all_contexts(n: int, pairs: np.ndarray, m: int) -> np.ndarray:
    per_pair = []
    for i, j in pairs:
        rest = [p for p in range(n) if p not in (i, j)]
        per_pair.append(list(itertools.combinations(rest, m)))
    return np.asarray(per_pair, dtype=np.int64).reshape(len(pairs), math.comb(n - 2, m), m)


def exact_with_estimator(fn, n, pairs, m):
    """The estimator's own code path (rows, batching, Δv) fed every context."""
    contexts = all_contexts(n, pairs, m)
    rows = pair_rows(n, pairs, contexts)
    values = set_function(fn)(rows)
    return delta_v(values, len(pairs), contexts.shape[1]).mean(dim=1).numpy()


@pytest.mark.parametrize("n", [4, 6, 8])
def test_all_contexts_equal_the_definition(n):
    fn = random_game(n, seed=n)
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    for m in range(n - 1):
        got = exact_with_estimator(fn, n, pairs, m)
        want = [definition(fn, n, i, j, m) for i, j in pairs]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_rows_follow_the_upstream_order():
    n = 9
    pairs = np.array([[2, 7], [0, 1]])
    contexts = np.array([[[4, 5], [0, 8]], [[3, 6], [2, 8]]])
    rows = pair_rows(n, pairs, contexts).view(2, 2, 4, n)
    for p, (i, j) in enumerate(pairs):
        for k in range(2):
            s = set(contexts[p, k].tolist())
            expected = [s | {i, j}, s | {i}, s | {j}, s]
            for t in range(4):
                assert set(np.flatnonzero(rows[p, k, t].numpy()).tolist()) == expected[t]


def test_orders_and_unique_context_shortcut():
    assert [order_of(256, r) for r in UPSTREAM_RATIOS] == [0, 12, 25, 50, 76, 101, 127, 152,
                                                            177, 203, 228, 241, 254]
    assert [order_of(196, r) for r in UPSTREAM_RATIOS] == [0, 9, 19, 38, 58, 77, 97, 116, 135,
                                                            155, 174, 184, 194]
    n, pairs = 16, sample_pairs(np.random.default_rng(0), 4, 5)
    rng = np.random.default_rng(1)
    for m in (0, n - 2):
        block = order_block(n, pairs, m, 7, rng)
        assert block.contexts == 1 and block.rows.shape[0] <= 3 * len(pairs) + 1
        shared = torch.zeros(n, dtype=torch.bool) if m == 0 else torch.ones(n, dtype=torch.bool)
        assert (block.rows == shared).all(dim=1).sum() == 1  # v(∅) or v(N): evaluated once
    contexts = sample_contexts(rng, n, pairs, 5, 7)
    for p, (i, j) in enumerate(pairs):
        for ctx in contexts[p]:
            assert len(set(ctx.tolist())) == 5 and i not in ctx and j not in ctx


def test_shortcut_estimate_equals_the_definition_at_the_ends():
    n, grid = 9, 3
    fn = random_game(n, 3)
    est = estimate_image(set_function(fn), n, (0.0, 1.0), 6, 5, seed=0, image_id=0, grid=grid,
                         batch_size=7)
    for r_index, m in enumerate((0, n - 2)):
        for p, (i, j) in enumerate(est.pairs):
            assert est.dv[r_index, p] == pytest.approx(definition(fn, n, i, j, m), abs=1e-6)
    assert est.forwards <= 2 * (3 * 6 + 1)


def test_sampled_estimate_is_unbiased():
    n, grid, K = 9, 3, 4
    fn = random_game(n, 11)
    ratios = (0.3, 0.6)
    estimates = np.stack([
        estimate_image(set_function(fn), n, ratios, 3, K, seed=s, image_id=0, grid=grid,
                       batch_size=64).dv.astype(np.float64).mean(-1)
        for s in range(60)])  # pairs depend on the seed, so compare per drawn pair
    pairs_by_seed = [sample_pairs(np.random.default_rng([s, 0, 0]), grid, 3) for s in range(60)]
    errors = []
    for s, pairs in enumerate(pairs_by_seed):
        for r_index, r in enumerate(ratios):
            m = order_of(n, r)
            for p, (i, j) in enumerate(pairs):
                errors.append(estimates[s, r_index, p] - definition(fn, n, i, j, m))
    errors = np.asarray(errors)
    # the mean error over 360 independent estimates is within 4 standard errors of 0
    assert abs(errors.mean()) < 4 * errors.std(ddof=1) / math.sqrt(len(errors))
    assert errors.std() > 0  # the estimates really are sampled


def test_pure_pair_and_gives_a_at_every_order():
    n, a = 8, 2.5
    fn = lambda s: a * (1 in s) * (5 in s)  # noqa: E731
    pairs = np.array([[1, 5], [5, 1], [0, 3], [1, 2]])
    for m in range(n - 1):
        got = exact_with_estimator(fn, n, pairs, m)
        np.testing.assert_allclose(got, [a, a, 0, 0], atol=1e-12)


def test_additive_function_has_no_interaction_exactly():
    n = 16
    weights = np.random.default_rng(0).normal(size=n)
    fn = lambda s: float(sum(weights[p] for p in sorted(s))) + 3.0  # noqa: E731
    est = estimate_image(set_function(fn), n, UPSTREAM_RATIOS, 5, 6, seed=2, image_id=4, grid=4,
                         batch_size=13)
    np.testing.assert_allclose(est.dv, 0.0, atol=1e-6)
    pairs = np.array([(i, j) for i in range(8) for j in range(i + 1, 8)])
    fn8 = lambda s: float(sum(weights[p] for p in sorted(s)))  # noqa: E731
    for m in range(7):
        np.testing.assert_allclose(exact_with_estimator(fn8, 8, pairs, m), 0.0, atol=1e-12)


def test_threshold_function_concentrates_at_the_right_orders():
    n, t = 8, 4
    fn = lambda s: float(len(s) >= t)  # noqa: E731
    pairs = np.array([(0, 1), (2, 6)])
    for m in range(n - 1):
        expected = 1.0 if m == t - 2 else (-1.0 if m == t - 1 else 0.0)
        np.testing.assert_allclose(exact_with_estimator(fn, n, pairs, m), expected, atol=1e-12)


def test_shapley_interaction_index_is_the_mean_over_orders():
    n = 6
    fn = random_game(n, 5)
    for i, j in [(0, 1), (2, 5)]:
        orders = [definition(fn, n, i, j, m) for m in range(n - 1)]
        # Shapley interaction index from its own definition (Grabisch), independently
        rest = [p for p in range(n) if p not in (i, j)]
        sii = 0.0
        for size in range(n - 1):
            weight = math.factorial(size) * math.factorial(n - size - 2) / math.factorial(n - 1)
            for s in itertools.combinations(rest, size):
                s = frozenset(s)
                sii += weight * (fn(s | {i, j}) - fn(s | {i}) - fn(s | {j}) + fn(s))
        assert np.mean(orders) == pytest.approx(sii, abs=1e-12)
        assert orders == pytest.approx([definition(fn, n, j, i, m) for m in range(n - 1)])


def test_shapley_interaction_index_against_shapiq():
    shapiq = pytest.importorskip("shapiq")  # optional oracle
    n = 5
    fn = random_game(n, 9)
    game = lambda coalitions: np.array([fn(frozenset(np.flatnonzero(c).tolist()))  # noqa: E731
                                        for c in coalitions])
    exact = shapiq.ExactComputer(n_players=n, game=game)
    sii = exact("SII", order=2)
    for i, j in [(0, 1), (1, 4)]:
        assert np.mean([definition(fn, n, i, j, m) for m in range(n - 1)]) == pytest.approx(
            sii[(i, j)], abs=1e-9)


def test_efficiency_decomposition():
    n = 6
    fn = random_game(n, 21)
    total = fn(frozenset(range(n))) - fn(frozenset())
    mains = sum(fn(frozenset({i})) - fn(frozenset()) for i in range(n))
    inter = sum((n - 1 - m) / (n * (n - 1)) * definition(fn, n, i, j, m)
                for i in range(n) for j in range(n) if i != j for m in range(n - 1))
    assert mains + inter == pytest.approx(total, abs=1e-10)


def test_batching_does_not_change_values():
    n, grid = 16, 4
    fn = random_game(n, 2)
    a = estimate_image(set_function(fn), n, (0.0, 0.3, 1.0), 4, 3, seed=1, image_id=9, grid=grid,
                       batch_size=5)
    b = estimate_image(set_function(fn), n, (0.0, 0.3, 1.0), 4, 3, seed=1, image_id=9, grid=grid,
                       batch_size=1000)
    np.testing.assert_array_equal(a.dv, b.dv)
    calls = []
    evaluate_blocks([order_block(n, a.pairs, 5, 3, np.random.default_rng(0))] * 2,
                    set_function(fn), 10, calls.append)
    assert calls == [10] * 9 + [6]  # full batches across block boundaries


def test_forward_counts():
    assert upstream_forwards(UPSTREAM_RATIOS, 200, 100) == 1_040_000
    # 11 interior orders × 4PK + 2 ends × (3P + 1)
    assert planned_forwards(256, UPSTREAM_RATIOS, 200, 100) == 11 * 80_000 + 2 * 601


def test_result_strength_debias_and_jackknife():
    rng = np.random.default_rng(0)
    dv = rng.normal(size=(5, 3, 4, 6)).astype(np.float32)
    dv[:, 0] = dv[:, 0, :, :1]  # a unique-context ratio: identical contexts
    res = InteractionResult(dv, np.zeros((5, 4, 2), np.int16), (0.0, 0.5, 1.0), (0, 7, 14), 4)
    i_hat = dv.astype(np.float64).mean(-1)
    np.testing.assert_allclose(res.A(), np.abs(i_hat).mean(axis=(0, 2)))
    np.testing.assert_allclose(res.J(), res.A() / res.A().mean())
    # A's jackknife equals the plain standard error of the per-image means
    per_image = np.abs(i_hat).mean(-1)
    np.testing.assert_allclose(res.stderr("A"), per_image.std(0, ddof=1) / np.sqrt(5))
    # debiasing changes nothing where the K contexts are identical, and shrinks elsewhere
    deb = res.strength_per_image(debiased=True)
    np.testing.assert_allclose(deb[:, 0], per_image[:, 0], rtol=1e-6)
    assert (deb[:, 1:] <= per_image[:, 1:] + 1e-12).all()
    uniform = res.J("uniform")
    a = res.A()
    np.testing.assert_allclose(uniform, a / ((a[0] + a[1]) / 4 + (a[1] + a[2]) / 4))


def test_result_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    res = InteractionResult(rng.normal(size=(2, 3, 4, 5)).astype(np.float32),
                            rng.integers(0, 16, size=(2, 4, 2)).astype(np.int16),
                            (0.0, 0.5, 1.0), (0, 7, 14), 4, [3, 9], [1, 0], {"seed": 3})
    res.save(tmp_path / "r")
    back = InteractionResult.load(tmp_path / "r")
    np.testing.assert_array_equal(back.dv, res.dv)
    np.testing.assert_array_equal(back.pairs, res.pairs)
    assert back.ratios == res.ratios and back.image_ids == [3, 9] and back.meta["seed"] == 3
    assert (tmp_path / "r" / "curve.png").is_file()
    header = (tmp_path / "r" / "curve.csv").read_text().splitlines()[0]
    assert header.startswith("ratio,order,A,A_stderr,J_sampled")
