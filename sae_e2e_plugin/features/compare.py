"""Two dictionaries side by side: for each feature of A, the feature of B whose decoder
direction is nearest by cosine similarity (the paper's cross-dictionary similarity), computed
a block of A's features at a time so the [d_sae_A, d_sae_B] matrix is never held whole."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped


@dataclass(frozen=True)
class Matches:
    """Each feature of A's nearest feature of B."""

    nearest: torch.Tensor
    """[d_sae_A] index of the nearest feature of B."""
    cosine: torch.Tensor
    """[d_sae_A] its cosine similarity."""


@jaxtyped(typechecker=beartype)
def nearest_by_cosine(
    w_dec_a: Float[torch.Tensor, "d_sae_a d_in"],
    w_dec_b: Float[torch.Tensor, "d_sae_b d_in"],
    chunk: int = 1024,
) -> Matches:
    """For each row of ``w_dec_a``, the row of ``w_dec_b`` with the largest cosine."""
    if w_dec_a.shape[1] != w_dec_b.shape[1]:
        raise ValueError(
            f"the two SAEs' decoders have widths {w_dec_a.shape[1]} and {w_dec_b.shape[1]}; "
            "--compare needs two dictionaries of the same activation (same d_in)."
        )
    unit_b = _unit_rows(w_dec_b)
    nearest, cosine = [], []
    for first in range(0, w_dec_a.shape[0], chunk):
        similarity = _unit_rows(w_dec_a[first : first + chunk]) @ unit_b.T
        best, index = similarity.max(dim=1)
        nearest.append(index)
        cosine.append(best)
    return Matches(nearest=torch.cat(nearest), cosine=torch.cat(cosine))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float().cpu()
    # A zero row (a feature never trained) stays zero: its cosine with anything is 0.
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def histogram(
    values: torch.Tensor, bins: int = 40, low: float = -1.0, high: float = 1.0
) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [low, high]."""
    return torch.histc(values.float(), bins=bins, min=low, max=high).long().tolist()
