"""Dictionary geometry: how close each feature's decoder direction is to others.

The paper compares dictionaries by (a) each feature's maximum cosine similarity with the
other features of the same dictionary (e2e dictionaries are more orthogonal) and (b) each
feature's maximum cosine similarity with the features of another dictionary (e.g. how many
e2e features have a close local counterpart). Decoder directions are the rows of SAELens'
``W_dec`` [d_sae, d_in]; zero rows (dead-at-init features) have cosine 0 with everything.
"""

from __future__ import annotations

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped

NEAR_DUPLICATE_COSINE = 0.99
"""A feature whose decoder direction has a cosine above this with another feature of its
dictionary is a near-duplicate."""


@jaxtyped(typechecker=beartype)
def unit_directions(w_dec: Float[torch.Tensor, "d_sae d_in"]) -> Float[torch.Tensor, "d_sae d_in"]:
    """Decoder rows scaled to unit norm (zero rows stay zero), in float32."""
    w = w_dec.detach().float()
    norms = w.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, w / norms.clamp_min(1e-12), torch.zeros_like(w))


@jaxtyped(typechecker=beartype)
def max_cosine_within(
    w_dec: Float[torch.Tensor, "d_sae d_in"], chunk_size: int = 4096
) -> Float[torch.Tensor, " d_sae"]:
    """For each feature, the largest cosine similarity with any *other* feature of the dictionary."""
    directions = unit_directions(w_dec)
    return _max_cosine(directions, directions, chunk_size, exclude_self=True)


@jaxtyped(typechecker=beartype)
def within_summary(w_dec: Float[torch.Tensor, "d_sae d_in"]) -> dict[str, float]:
    """The two numbers the paper's geometry comparison turns on: the median over features of
    ``max_cosine_within`` (``max_cosine_median``; lower is more orthogonal) and the share of
    near-duplicate features (``near_duplicate_fraction``)."""
    best = max_cosine_within(w_dec)
    return {
        "max_cosine_median": float(best.quantile(0.5)),  # the middle two's mean for even d_sae
        "near_duplicate_fraction": float((best > NEAR_DUPLICATE_COSINE).float().mean()),
    }


@jaxtyped(typechecker=beartype)
def max_cosine_across(
    w_dec: Float[torch.Tensor, "d_sae d_in"],
    other_w_dec: Float[torch.Tensor, "d_sae_other d_in"],
    chunk_size: int = 4096,
) -> Float[torch.Tensor, " d_sae"]:
    """For each feature of ``w_dec``, the largest cosine similarity with any feature of ``other_w_dec``."""
    return _max_cosine(
        unit_directions(w_dec), unit_directions(other_w_dec), chunk_size, exclude_self=False
    )


def _max_cosine(
    a: torch.Tensor, b: torch.Tensor, chunk_size: int, exclude_self: bool
) -> torch.Tensor:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if exclude_self and a.shape[0] < 2:
        raise ValueError("a dictionary needs at least 2 features for a within-dictionary maximum.")
    best = []
    # [chunk, d_sae_b] similarities at a time, so large dictionaries fit in memory.
    for start in range(0, a.shape[0], chunk_size):
        sims = a[start : start + chunk_size] @ b.T
        if exclude_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -torch.inf
        best.append(sims.max(dim=-1).values)
    return torch.cat(best)
