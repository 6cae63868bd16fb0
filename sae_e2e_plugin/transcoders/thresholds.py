"""The JumpReLU threshold a per-token top-k transcoder is exported with.

A per-token top-k is not a JumpReLU: which features a token keeps depends on the token's other
pre-activations, while a JumpReLU compares each one with a fixed threshold. No threshold gives
the same output on every token. What a single threshold θ can match is the *number* of active
features over a batch: θ between the batch's (k·N)-th and (k·N + 1)-th largest (ReLU'd)
pre-activations keeps exactly k·N of them, k per token on average. That is the threshold a
batch top-k SAE uses, and SAELens exports batch top-k SAEs as JumpReLU SAEs with it.

On a given token the exported JumpReLU keeps exactly the top-k set when the token's k-th
largest pre-activation is above θ and its (k+1)-th is at or below it; tokens with more large
pre-activations keep more than k features, tokens with fewer keep fewer.
"""

from __future__ import annotations

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped


@jaxtyped(typechecker=beartype)
def batch_topk_threshold(
    hidden_pre: Float[torch.Tensor, "tokens d_sae"], k: int | float
) -> Float[torch.Tensor, ""]:
    """The threshold that keeps k·N of the batch's N·d_sae ReLU'd pre-activations: halfway
    between the (k·N)-th and (k·N + 1)-th largest (0 when fewer than k·N are positive), in
    float64 as SAELens keeps its batch top-k threshold."""
    flat = hidden_pre.detach().relu().flatten().double()
    n_keep = int(k * hidden_pre.shape[0])
    if n_keep >= flat.numel():
        return flat.new_zeros(())
    top = torch.topk(flat, n_keep + 1, sorted=True).values
    return (top[-2] + top[-1]) / 2 if n_keep > 0 else top[0]


@jaxtyped(typechecker=beartype)
def tokens_where_exact(
    hidden_pre: Float[torch.Tensor, "tokens d_sae"], k: int, threshold: float
) -> torch.Tensor:
    """[tokens] bool: where a JumpReLU at ``threshold`` keeps exactly the per-token top-k set
    (the k-th largest pre-activation above the threshold, the (k+1)-th not; k < d_sae)."""
    top = torch.topk(hidden_pre.detach().double(), k + 1, dim=-1, sorted=True).values
    return (top[:, k - 1] > threshold) & (top[:, k] <= threshold)


def moving_average(old: torch.Tensor, new: torch.Tensor, rate: float) -> torch.Tensor:
    """``(1 − rate)·old + rate·new``: SAELens' batch top-k threshold update, in ``old``'s dtype."""
    return (1 - rate) * old + rate * new.to(old.dtype)
