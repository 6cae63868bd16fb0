"""The tokens whose logits a feature's decoder direction raises and lowers most, read through
the unembedding as feature dashboards do: ``W_dec[i] @ W_U`` with the final norm's learned
weight folded into ``W_U`` (and, for a LayerNorm, the direction centred first). The norm's
division by each token's scale is left out: it is one positive number per token, so it
changes the size of every logit of that token alike, not which tokens come first. The
unembedding's bias is left out too: it does not depend on the feature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped

from sae_e2e_plugin.core import hf_modules


@dataclass(frozen=True)
class Unembedding:
    """What multiplies a residual-stream direction into logits."""

    w_u: torch.Tensor
    """[d_model, vocab] the unembedding with the final norm's weight folded in (float32)."""
    centre: bool
    """Whether the final norm is a LayerNorm (the direction's mean is removed first)."""


def model_unembedding(model: Any) -> Unembedding | None:
    """The model's ``Unembedding`` (None when it has no separate output head)."""
    if hf_modules.is_hf_model(model):
        return _hf_unembedding(model)
    w_u = model.unembed.W_U.detach().float().cpu()
    norm_type = model.cfg.normalization_type
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    if weight is not None:
        w_u = weight.detach().float().cpu()[:, None] * w_u
    return Unembedding(w_u=w_u, centre=norm_type in ("LN", "LNPre"))


def _hf_unembedding(model: Any) -> Unembedding | None:
    hf = hf_modules.hf_model_of(model)
    head = hf.get_output_embeddings()
    if head is None:
        return None
    w_u = head.weight.detach().float().cpu().T
    norm_path = hf_modules.find_final_norm(hf)
    norm = hf.get_submodule(norm_path) if norm_path else None
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.shape == (w_u.shape[0],):
        w_u = weight.detach().float().cpu()[:, None] * w_u
    return Unembedding(w_u=w_u, centre=isinstance(norm, torch.nn.LayerNorm))


@dataclass(frozen=True)
class LogitEffects:
    """Per feature, the tokens raised and lowered most and by how much."""

    raised_ids: torch.Tensor
    """[features, k] token ids, largest logit first."""
    raised: torch.Tensor
    """[features, k] their logits."""
    lowered_ids: torch.Tensor
    """[features, k] token ids, most negative first."""
    lowered: torch.Tensor


@jaxtyped(typechecker=beartype)
def direction_logits(
    directions: Float[torch.Tensor, "features d_model"], unembedding: Unembedding
) -> Float[torch.Tensor, "features vocab"]:
    """Each direction's logits: ``direction @ W_U`` (after centring for a LayerNorm)."""
    directions = directions.detach().float().cpu()
    if unembedding.centre:
        directions = directions - directions.mean(-1, keepdim=True)
    return directions @ unembedding.w_u


def logit_effects(
    w_dec: torch.Tensor, features: list[int], unembedding: Unembedding, k: int, chunk: int = 256
) -> LogitEffects:
    """The ``k`` most raised and lowered tokens of each listed feature (rows of ``w_dec``)."""
    if w_dec.shape[1] != unembedding.w_u.shape[0]:
        raise ValueError(
            f"the SAE's decoder writes vectors of width {w_dec.shape[1]}, but the unembedding "
            f"reads width {unembedding.w_u.shape[0]}; the logit table needs a residual-stream "
            "SAE (pass no_logits=True / --no-logits for this SAE)."
        )
    parts: list[tuple[torch.Tensor, ...]] = []
    for first in range(0, len(features), chunk):
        rows = w_dec[features[first : first + chunk]]
        logits = direction_logits(rows, unembedding)
        raised, raised_ids = logits.topk(k, dim=1)
        lowered, lowered_ids = logits.topk(k, dim=1, largest=False)
        parts.append((raised_ids, raised, lowered_ids, lowered))
    if not parts:
        empty_ids, empty = torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
        return LogitEffects(empty_ids, empty, empty_ids, empty)
    return LogitEffects(*(torch.cat(column) for column in zip(*parts, strict=True)))
