"""Dictionary geometry against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from sae_e2e_plugin.analysis.geometry import (
    max_cosine_across,
    max_cosine_within,
    unit_directions,
    within_summary,
)
from sae_e2e_plugin.analysis.matched_l0 import ce_increase_at, gap_closed


def hand_cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def test_within_dictionary_maximum_excludes_the_feature_itself() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, -3.0], [1.0, 1.0, 1.0]])
    got = max_cosine_within(w)
    expected = [max(hand_cosine(w[i], w[j]) for j in range(4) if j != i) for i in range(4)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert got[0].item() == pytest.approx(1 / math.sqrt(2))  # not 1.0 from itself


def test_within_summary_is_the_median_max_cosine_and_the_near_duplicate_share() -> None:
    # Features 0 and 1 nearly coincide (cosine 0.9995), 2 and 3 are orthogonal to everything.
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0316, 0.0], [0.0, 0.0, 2.0], [0.0, -1.0, 0.0]])
    best = [max(hand_cosine(w[i], w[j]) for j in range(4) if j != i) for i in range(4)]
    summary = within_summary(w)
    ordered = sorted(best)
    assert summary["max_cosine_median"] == pytest.approx((ordered[1] + ordered[2]) / 2, abs=1e-6)
    assert summary["near_duplicate_fraction"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunking_does_not_change_the_result(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(17, 5, generator=gen)
    other = torch.randn(9, 5, generator=gen)
    full = torch.stack(
        [torch.tensor(max(hand_cosine(w[i], other[j]) for j in range(9))) for i in range(17)]
    )
    torch.testing.assert_close(
        max_cosine_across(w, other, chunk_size=chunk_size), full, rtol=1e-5, atol=1e-6
    )
    within = torch.stack(
        [torch.tensor(max(hand_cosine(w[i], w[j]) for j in range(17) if j != i)) for i in range(17)]
    )
    torch.testing.assert_close(
        max_cosine_within(w, chunk_size=chunk_size), within, rtol=1e-5, atol=1e-6
    )


def test_identical_dictionaries_match_perfectly_across() -> None:
    w = torch.randn(6, 4)
    torch.testing.assert_close(max_cosine_across(w, 3 * w), torch.ones(6), rtol=1e-5, atol=1e-5)


def test_zero_rows_have_zero_similarity() -> None:
    w = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert unit_directions(w)[0].abs().sum() == 0
    assert max_cosine_within(w)[0].item() == 0.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="at least 2 features"):
        max_cosine_within(torch.ones(1, 3))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        max_cosine_within(torch.ones(3, 3), chunk_size=0)


def test_ce_increase_at_is_linear_in_log_l0_between_runs_and_none_outside() -> None:
    points = [(100.0, 1.0), (10.0, 3.0), (1000.0, 0.5)]
    # Halfway between L0 10 and 100 in log L0 is sqrt(10 * 100).
    assert ce_increase_at(points, math.sqrt(1000.0)) == pytest.approx(2.0)
    assert ce_increase_at(points, 10**2.25) == pytest.approx(1.0 - 0.25 * 0.5)
    assert ce_increase_at(points, 100.0) == pytest.approx(1.0)
    assert ce_increase_at(points, 1000.0) == pytest.approx(0.5)
    # Within 5% beyond the end runs their values stand; further out, no number.
    assert ce_increase_at(points, 9.6) == 3.0 and ce_increase_at(points, 1049.0) == 0.5
    assert ce_increase_at(points, 9.5) is None and ce_increase_at(points, 1051.0) is None
    assert ce_increase_at([(50.0, 2.0)], 50.0) == 2.0 and ce_increase_at([], 50.0) is None


def test_gap_closed_against_a_hand_computation() -> None:
    local = [(40.0, 9.0), (160.0, 3.0)]
    e2e = [(20.0, 2.0), (80.0, 1.0)]
    # At L0 80, halfway in log L0 between local's runs: local 6.0; e2e's run there: 1.0.
    assert gap_closed((80.0, 2.0), local, e2e) == pytest.approx((6.0 - 2.0) / (6.0 - 1.0))
    assert gap_closed((80.0, 6.0), local, e2e) == pytest.approx(0.0)
    assert gap_closed((80.0, 0.5), local, e2e) == pytest.approx(1.1)
    assert gap_closed((100.0, 2.0), local, e2e) is None  # beyond e2e's runs: not extrapolated
    assert gap_closed((82.0, 2.0), local, e2e) == pytest.approx(  # 2.5% beyond: e2e's run
        (9.0 - 6.0 * math.log(82 / 40) / math.log(4) - 2.0)
        / (9.0 - 6.0 * math.log(82 / 40) / math.log(4) - 1.0)
    )
