"""The pass over the tokens: the model runs only up to each SAE's hook (the blocks after it
are never run), the SAE encodes, and ``FeatureStats`` keeps what it needs, the activations
around each kept example included (so no second pass is needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped

from sae_e2e_plugin.core import model_splice
from sae_e2e_plugin.core.splice import SplicePlan
from sae_e2e_plugin.features.stats import FeatureStats

Progress = Callable[[int], object]
"""Called with the number of tokens just processed (a progress bar's ``update``)."""


@dataclass(frozen=True)
class Dictionary:
    """One SAE to inspect, with its splice plan on the model."""

    sae: Any
    plan: SplicePlan


def plan_dictionary(model: Any, sae: Any, hook_name: str | None = None) -> Dictionary:
    """The SAE's hook checked against the model (its width too); no downstream hooks."""
    hook = hook_name or sae.cfg.metadata.hook_name
    if not hook:
        raise ValueError(
            "the SAE's metadata records no hook_name; pass hook_name (e.g. "
            "'blocks.6.hook_resid_pre' or, for a Hugging Face model, 'model.layers.6')."
        )
    if getattr(sae, "hook_z_reshaping_mode", False) or sae.cfg.metadata.hook_head_index is not None:
        raise ValueError(
            f"the SAE at hook_name={hook!r} reads attention heads (hook_z reshaping or "
            "hook_head_index); inspect reads SAEs on a flat activation. Export the SAE "
            "without hook_z reshaping."
        )
    plan = model_splice.plan_splice(model, hook, (), d_in=sae.cfg.d_in)
    return Dictionary(sae=sae, plan=plan)


@torch.no_grad()
def hook_activations(model: Any, plan: SplicePlan, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos, d_in] activation at the plan's hook; the model stops after that block."""
    prefix = model_splice.run_prefix(model, tokens, plan)
    return model_splice.run_clean(model, prefix, plan, full=False).acts


@jaxtyped(typechecker=beartype)
@torch.no_grad()
def encode(
    sae: Any, acts: Float[torch.Tensor, "batch pos d_in"]
) -> Float[torch.Tensor, "batch pos d_sae"]:
    """The SAE's feature activations (dense, float32, on the CPU)."""
    batch, pos, d_in = acts.shape
    features = sae.encode(acts.reshape(batch * pos, d_in).to(sae.device, sae.dtype))
    if features.is_sparse:
        features = features.to_dense()
    return features.float().cpu().reshape(batch, pos, -1)


def token_batches(tokens: torch.Tensor, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(first sequence index, sequences) for each batch of ``batch_size`` sequences."""
    return [(i, tokens[i : i + batch_size]) for i in range(0, tokens.shape[0], batch_size)]


def collect_stats(
    model: Any,
    dictionaries: Sequence[Dictionary],
    tokens: Int[torch.Tensor, "seq pos"],
    stats: Sequence[FeatureStats],
    batch_size: int,
    progress: Progress | None = None,
) -> None:
    """One pass over ``tokens``: each dictionary's statistics updated in token order."""
    device = model_splice.model_facts(model).device
    for _, batch in token_batches(tokens, batch_size):
        by_hook: dict[str, torch.Tensor] = {}
        for dictionary, feature_stats in zip(dictionaries, stats, strict=True):
            hook = dictionary.plan.hook_name
            if hook not in by_hook:  # two SAEs at one hook share the model's run
                by_hook[hook] = hook_activations(model, dictionary.plan, batch.to(device))
            features = encode(dictionary.sae, by_hook[hook])
            feature_stats.update(features.reshape(-1, features.shape[-1]))
        if progress is not None:
            progress(batch.numel())


@dataclass(frozen=True)
class Window:
    """A feature's activations on the tokens around one example token."""

    sequence: int
    position: int
    """The example token's position in its sequence."""
    start: int
    """The window's first position."""
    token_ids: tuple[int, ...]
    acts: tuple[float, ...]


@dataclass(frozen=True)
class WindowRequest:
    """A window to read: feature ``feature`` around flat token ``token``."""

    feature: int
    token: int


def window_of(stats: FeatureStats, tokens: torch.Tensor, request: WindowRequest) -> Window:
    """The window kept around an example of ``stats`` (a top or a sampled token)."""
    start, acts = stats.window(request.feature, request.token)
    sequence, position = divmod(request.token, tokens.shape[1])
    return Window(
        sequence=sequence,
        position=position,
        start=start,
        token_ids=tuple(tokens[sequence, start : start + len(acts)].tolist()),
        acts=tuple(acts),
    )
