"""Which positions the SAE reads and replaces: SAELens' ``seqpos_slice`` and ``exclude_special_tokens``.

Positions outside the slice, or holding an excluded token id, are not given to the SAE: its
input is the activations of the selected positions only (so its reconstruction, sparsity and
auxiliary terms and the dead-feature statistics ignore the others), and the patched run keeps
the clean activation everywhere else. The KL and the downstream terms still cover every
position: the patched run differs from the clean one wherever the SAE's positions influence it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from einops import rearrange
from jaxtyping import Bool, Float, Int, jaxtyped


@dataclass(frozen=True)
class PositionFilter:
    """The positions of each sequence that the SAE reads and replaces."""

    seqpos_slice: tuple[int | None, ...] = (None,)
    """``slice(*seqpos_slice)`` of the positions, as SAELens' field of that name."""
    excluded_ids: tuple[int, ...] = ()
    """Token ids whose positions are left out (SAELens' ``exclude_special_tokens``, resolved)."""

    @property
    def selects_all(self) -> bool:
        """Whether every position is selected (then the masks are skipped altogether)."""
        return not self.excluded_ids and slice(*self.seqpos_slice) == slice(None)


@jaxtyped(typechecker=beartype)
def selected_positions(
    tokens: Int[torch.Tensor, "batch pos"], positions: PositionFilter
) -> Bool[torch.Tensor, "batch pos"]:
    """True where the SAE reads and replaces the activation."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, slice(*positions.seqpos_slice)] = True
    if positions.excluded_ids:
        excluded = torch.tensor(positions.excluded_ids, device=tokens.device)
        mask &= ~torch.isin(tokens, excluded)
    return mask


@jaxtyped(typechecker=beartype)
def step_mask(
    tokens: Int[torch.Tensor, "batch pos"], positions: PositionFilter
) -> Bool[torch.Tensor, "batch pos"] | None:
    """A training step's positions: None when the SAE takes every one (no mask to apply); an
    error when the filter leaves none in the batch (a step would train on nothing)."""
    if positions.selects_all:
        return None
    mask = selected_positions(tokens, positions)
    if not mask.any():
        raise ValueError(
            f"no position of this batch is selected by seqpos_slice={positions.seqpos_slice} "
            f"and exclude_special_tokens (ids {list(positions.excluded_ids)}): every token is "
            "excluded. Exclude fewer ids."
        )
    return mask


@jaxtyped(typechecker=beartype)
def with_reconstruction(
    clean: Float[torch.Tensor, "batch pos d_in"],
    mask: Bool[torch.Tensor, "batch pos"],
    reconstruction: Float[torch.Tensor, "selected d_in"],
) -> Float[torch.Tensor, "batch pos d_in"]:
    """``clean`` with the selected positions' rows replaced by ``reconstruction`` (in row-major
    order of ``mask``, as ``clean[mask]`` reads them). Gradient flows into ``reconstruction``
    only: the other positions are the clean activations, constants of the step."""
    return clean.to(reconstruction.dtype).index_put((mask,), reconstruction)


@jaxtyped(typechecker=beartype)
def selected_rows(
    acts: Float[torch.Tensor, "batch pos d_in"], mask: Bool[torch.Tensor, "batch pos"] | None
) -> Float[torch.Tensor, "selected d_in"]:
    """The SAE's input rows: every position (``mask`` None), or the selected ones in row-major
    order (the order ``with_reconstruction`` writes them back in)."""
    if mask is None:
        return rearrange(acts, "batch pos d_in -> (batch pos) d_in")
    return acts[mask]
