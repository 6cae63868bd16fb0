"""Pure loss functions of the end-to-end objectives.

Every function here is a plain function of tensors: no model state, no hooks.
The KL direction is part of each KL function's name: ``kl_orig_to_patched`` is
KL(p_orig ‖ p_patched) = Σ_v p_orig(v) (log p_orig(v) − log p_patched(v)),
the direction the reference implementation's code computes (its docstring says
the opposite; the code is what trained the published SAEs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch.utils.checkpoint import checkpoint

# Maps a chunk of final residuals [tokens, d_model] to logits [tokens, vocab].
ResidToLogits = Callable[[torch.Tensor], torch.Tensor]


@jaxtyped(typechecker=beartype)
def kl_orig_to_patched(
    logits_orig: Float[torch.Tensor, "*tokens vocab"],
    logits_patched: Float[torch.Tensor, "*tokens vocab"],
) -> Float[torch.Tensor, ""]:
    """KL(p_orig ‖ p_patched), summed over the vocabulary, averaged over tokens.

    Both inputs are raw logits; the log-softmax is taken in float32 whatever
    their dtype, since bf16 log-probabilities lose the small differences that
    the KL is made of.
    """
    return kl_orig_to_patched_sum(logits_orig, logits_patched) / _n_tokens(logits_orig)


@jaxtyped(typechecker=beartype)
def kl_orig_to_patched_sum(
    logits_orig: Float[torch.Tensor, "*tokens vocab"],
    logits_patched: Float[torch.Tensor, "*tokens vocab"],
) -> Float[torch.Tensor, ""]:
    """KL(p_orig ‖ p_patched) summed over the vocabulary *and* the tokens."""
    logp_orig = F.log_softmax(logits_orig.float(), dim=-1)
    logp_patched = F.log_softmax(logits_patched.float(), dim=-1)
    return (logp_orig.exp() * (logp_orig - logp_patched)).sum()


@jaxtyped(typechecker=beartype)
def chunked_kl_orig_to_patched(
    resid_orig: Float[torch.Tensor, "tokens d_model"],
    resid_patched: Float[torch.Tensor, "tokens d_model"],
    resid_to_logits: ResidToLogits,
    chunk_size: int,
) -> Float[torch.Tensor, ""]:
    """KL(p_orig ‖ p_patched) from final residual streams, a chunk of tokens at a time.

    ``resid_to_logits`` is the model's head (final norm + unembedding). Each chunk's
    logits are made, reduced to a KL sum and dropped; under autograd the chunk is
    checkpointed, so the backward pass recomputes that chunk's logits instead of
    keeping them. Peak memory holds two [chunk_size, vocab] logit tensors rather
    than several [tokens, vocab] ones. The value and gradient equal
    ``kl_orig_to_patched`` on the full logits (up to float summation order).
    """
    if chunk_size < 1:
        raise ValueError(f"kl_chunk_size must be >= 1, got {chunk_size}.")
    n_tokens = resid_orig.shape[0]
    total = resid_patched.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk_size):
        orig = resid_orig[start : start + chunk_size]
        patched = resid_patched[start : start + chunk_size]
        if patched.requires_grad:
            total = total + checkpoint(
                _chunk_kl_sum, orig, patched, resid_to_logits, use_reentrant=False
            )
        else:
            total = total + _chunk_kl_sum(orig, patched, resid_to_logits)
    return total / n_tokens


def _chunk_kl_sum(
    resid_orig: torch.Tensor,
    resid_patched: torch.Tensor,
    resid_to_logits: ResidToLogits,
) -> torch.Tensor:
    with torch.no_grad():
        logits_orig = resid_to_logits(resid_orig)
    return kl_orig_to_patched_sum(logits_orig, resid_to_logits(resid_patched))


@jaxtyped(typechecker=beartype)
def mse_mean(
    patched: Float[torch.Tensor, "*shape"],
    target: Float[torch.Tensor, "*shape"],
) -> Float[torch.Tensor, ""]:
    """Mean squared error averaged over every element (batch, position and d_model).

    This is the reference implementation's downstream term
    (``F.mse_loss(..., reduction="mean")``), computed in float32.
    """
    return F.mse_loss(patched.float(), target.float(), reduction="mean")


def downstream_loss(
    patched: dict[str, torch.Tensor],
    clean: dict[str, torch.Tensor],
    total_coefficient: float,
) -> dict[str, torch.Tensor]:
    """Weighted downstream terms, one per hook: (total_coefficient / n_hooks) · MSE_k.

    The coefficient is split evenly across the hooks, as in the reference
    implementation, so adding hooks does not change the term's overall weight.
    """
    if set(patched) != set(clean):
        raise ValueError(
            f"downstream hooks differ between runs: patched {sorted(patched)}, "
            f"clean {sorted(clean)}."
        )
    per_hook = total_coefficient / max(len(patched), 1)
    return {name: per_hook * mse_mean(patched[name], clean[name]) for name in patched}


def _n_tokens(logits: torch.Tensor) -> int:
    return max(logits[..., 0].numel(), 1)
