"""The result contract on the interactions results: one model's curve and a comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from narrows.interactions.result import InteractionComparison, InteractionResult
from narrows.runs.results import flat_summary
from tests.tiny import check_result_contract


def _result(seed: int) -> InteractionResult:
    rng = np.random.default_rng(seed)
    return InteractionResult(rng.normal(size=(2, 3, 4, 5)).astype(np.float32),
                             rng.integers(0, 16, size=(2, 4, 2)).astype(np.int16),
                             (0.0, 0.5, 1.0), (0, 7, 14), 4, [3, 9], [1, 0], {"seed": seed})


def test_one_curve_meets_the_contract(tmp_path):
    check_result_contract(_result(0), tmp_path, "run", "run/meta.json", "interactions")


def test_a_comparison_meets_the_contract_and_keeps_its_order(tmp_path):
    comparison = InteractionComparison({"trained": _result(1), "init": _result(2)})
    check_result_contract(comparison, tmp_path, "compare", "compare/comparison.json",
                          "interactions_comparison")
    back = InteractionComparison.load(tmp_path / "compare")
    assert list(back.results) == ["trained", "init"]  # not sorted: the order given
    np.testing.assert_array_equal(back.results["init"].dv, comparison.results["init"].dv)


def test_the_comparison_headline_is_each_model_s_curve(tmp_path):
    comparison = InteractionComparison({"a": _result(1), "b": _result(2)})
    doc = flat_summary(comparison, command="interactions compare")
    json.dumps(doc)
    for label in ("a", "b"):
        J = comparison.results[label].J()
        for r, value in zip((0.0, 0.5, 1.0), J, strict=True):
            assert doc[f"{label}.J@{r:g}"] == pytest.approx(float(value))
