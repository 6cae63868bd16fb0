"""A feature's effect on the model's output: on each of its top contexts, the feature alone is
removed from the model's own activation at every position of the sequence (its activation
times its decoder direction subtracted; the rest of the activation, the SAE's error included,
is kept), the model runs on from the hook, and KL(p_clean ‖ p_ablated) of the next-token
distribution is read at the context's top token. The effect is the mean over the contexts.

Sequences are cut after the top token (the model is causal, so later tokens change nothing
there), and contexts are batched by length across features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_e2e_plugin.core import losses, model_splice
from sae_e2e_plugin.features.passes import Dictionary, Progress, encode


@dataclass(frozen=True)
class AblationContext:
    """Feature ``feature`` ablated on flat token ``token`` (its sequence cut after it)."""

    feature: int
    token: int


@torch.no_grad()
def ablation_kls(
    model: Any,
    dictionary: Dictionary,
    tokens: torch.Tensor,
    contexts: Sequence[AblationContext],
    batch_size: int,
    progress: Progress | None = None,
) -> list[float]:
    """KL(p_clean ‖ p_ablated) at each context's token, in the order of ``contexts``."""
    context_size = tokens.shape[1]
    order = sorted(range(len(contexts)), key=lambda i: contexts[i].token % context_size)
    results = [0.0] * len(contexts)
    w_dec = dictionary.sae.W_dec.detach()
    device = model_splice.model_facts(model).device
    head = None
    for first in range(0, len(order), batch_size):
        chosen = [contexts[i] for i in order[first : first + batch_size]]
        positions = torch.tensor([c.token % context_size for c in chosen])
        rows = torch.tensor([c.token // context_size for c in chosen])
        features = torch.tensor([c.feature for c in chosen])
        batch = tokens[rows, : int(positions.max()) + 1].to(device)
        prefix = model_splice.run_prefix(model, batch, dictionary.plan)
        clean = model_splice.run_clean(model, prefix, dictionary.plan, full=True)
        acts = clean.acts
        feature_acts = encode(dictionary.sae, acts)  # [batch, pos, d_sae]
        own = feature_acts[torch.arange(len(chosen)), :, features]  # [batch, pos]
        directions = w_dec[features].float().cpu()  # [batch, d_in]
        removed = own.unsqueeze(-1) * directions.unsqueeze(1)
        ablated = acts - removed.to(acts.device, acts.dtype)
        patched = model_splice.run_patched(model, prefix, dictionary.plan, ablated)
        head = head or model_splice.model_head(model, dictionary.plan)
        index = (torch.arange(len(chosen)), positions)
        assert clean.final_resid is not None
        clean_logits = head(clean.final_resid[index])
        patched_logits = head(patched.final_resid[index])
        for j, i in enumerate(order[first : first + batch_size]):
            kl = losses.kl_orig_to_patched(clean_logits[j : j + 1], patched_logits[j : j + 1])
            # A KL is >= 0; float32 rounding leaves about -1e-7 where the feature does nothing.
            results[i] = max(0.0, float(kl))
        if progress is not None:
            progress(len(chosen))
    return results


def mean_effects(contexts: Sequence[AblationContext], kls: Sequence[float]) -> dict[int, float]:
    """Each feature's mean KL over its contexts."""
    totals: dict[int, list[float]] = {}
    for context, kl in zip(contexts, kls, strict=True):
        totals.setdefault(context.feature, []).append(kl)
    return {feature: sum(values) / len(values) for feature, values in totals.items()}
