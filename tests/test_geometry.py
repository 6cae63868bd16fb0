"""Dictionary geometry against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from sae_e2e_plugin.analysis.geometry import max_cosine_across, max_cosine_within, unit_directions


def hand_cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def test_within_dictionary_maximum_excludes_the_feature_itself() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, -3.0], [1.0, 1.0, 1.0]])
    got = max_cosine_within(w)
    expected = [max(hand_cosine(w[i], w[j]) for j in range(4) if j != i) for i in range(4)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert got[0].item() == pytest.approx(1 / math.sqrt(2))  # not 1.0 from itself


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
