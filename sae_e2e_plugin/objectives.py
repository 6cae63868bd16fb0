"""The registry of training objectives: ``loss="local" | "e2e" | "e2e_downstream"`` and user ones.

An objective turns one step's runs of the model into weighted loss terms. The
trainer adds them to the SAE's own sparsity and auxiliary terms (from its
``calculate_aux_loss``). Objectives are looked up by name, so a user can add one
with ``register_objective`` and select it with ``loss="<name>"``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformer

from sae_e2e_plugin.losses import chunked_kl_orig_to_patched, downstream_loss, mse_mean
from sae_e2e_plugin.splice import (
    CleanRun,
    PatchedRun,
    Prefix,
    SplicePlan,
    model_head,
    run_patched,
)


@dataclass
class ObjectiveInputs:
    """What an objective sees in one training step."""

    model: HookedTransformer
    """The frozen language model."""
    prefix: Prefix
    """The shared state entering the SAE's block (pass it to ``run_patched``)."""
    plan: SplicePlan
    """The SAE's hook and the downstream hooks."""
    clean: CleanRun
    """The clean run: SAE input, final residual, downstream activations (no grad)."""
    reconstruction: torch.Tensor
    """[batch, pos, d_in] the SAE's output on the model's own scale (carries grad)."""
    coefficients: Any
    """The run's config (``E2ERunnerConfig``): read the objective's coefficients from it."""


@dataclass
class ObjectiveOutput:
    """An objective's contribution to one step."""

    losses: dict[str, torch.Tensor]
    """Weighted terms, added to the loss and logged as ``losses/<name>``."""
    metrics: dict[str, torch.Tensor]
    """Unweighted values, logged as ``metrics/<name>``."""


ObjectiveFn = Callable[[ObjectiveInputs], ObjectiveOutput]


@dataclass(frozen=True)
class Objective:
    """A registered objective."""

    name: str
    fn: ObjectiveFn
    needs_full_run: bool
    """Whether the clean run must reach the logits (False: stop after the SAE's block)."""
    uses_downstream_hooks: bool
    """Whether the clean and patched runs record the downstream hooks."""
    local_mse_weight: Callable[[Any], float]
    """Weight of SAELens' own reconstruction MSE given the config (1 for "local")."""


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(
    name: str,
    fn: ObjectiveFn,
    *,
    needs_full_run: bool = True,
    uses_downstream_hooks: bool = False,
    local_mse_weight: Callable[[Any], float] | None = None,
) -> Objective:
    """Add an objective under ``name``; select it with ``E2ERunnerConfig(loss=name)``.

    ``local_mse_weight`` maps the config to the weight of SAELens' reconstruction
    MSE at the SAE's hook; by default it is the config's ``local_mse_coefficient``.
    Registering a name twice raises, as SAELens' own registries do.
    """
    if name in _OBJECTIVES:
        raise ValueError(f"an objective named {name!r} is already registered.")
    objective = Objective(
        name=name,
        fn=fn,
        needs_full_run=needs_full_run,
        uses_downstream_hooks=uses_downstream_hooks,
        local_mse_weight=local_mse_weight or (lambda cfg: cfg.local_mse_coefficient),
    )
    _OBJECTIVES[name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The objective registered under ``name``; ValueError listing the choices otherwise."""
    if name not in _OBJECTIVES:
        raise ValueError(
            f"loss={name!r} is not a known objective. Choose one of {available_objectives()}, "
            "or add one with sae_e2e_plugin.register_objective."
        )
    return _OBJECTIVES[name]


def available_objectives() -> list[str]:
    """Names of all registered objectives."""
    return sorted(_OBJECTIVES)


def _local(inputs: ObjectiveInputs) -> ObjectiveOutput:
    # SAELens' own MSE (kept at weight 1) is the whole objective.
    return ObjectiveOutput(losses={}, metrics={})


def _e2e(inputs: ObjectiveInputs) -> ObjectiveOutput:
    patched = _run_patched(inputs)
    kl = _kl(inputs, patched.final_resid)
    return ObjectiveOutput(
        losses={"kl_loss": inputs.coefficients.kl_coefficient * kl},
        metrics={"kl_orig_patched": kl.detach()},
    )


def _e2e_downstream(inputs: ObjectiveInputs) -> ObjectiveOutput:
    cfg = inputs.coefficients
    patched = _run_patched(inputs)
    kl = _kl(inputs, patched.final_resid)
    terms = downstream_loss(patched.downstream, inputs.clean.downstream, cfg.downstream_coefficient)
    losses = {"kl_loss": cfg.kl_coefficient * kl}
    losses |= {f"downstream_mse_loss/{name}": term for name, term in terms.items()}
    metrics = {"kl_orig_patched": kl.detach()}
    for name in terms:
        raw = mse_mean(patched.downstream[name].detach(), inputs.clean.downstream[name])
        metrics[f"downstream_mse/{name}"] = raw
    return ObjectiveOutput(losses=losses, metrics=metrics)


def _run_patched(inputs: ObjectiveInputs) -> PatchedRun:
    return run_patched(
        inputs.model,
        inputs.prefix,
        inputs.plan,
        inputs.reconstruction,
        checkpoint_blocks=inputs.coefficients.checkpoint_blocks,
    )


def _kl(inputs: ObjectiveInputs, patched_final_resid: torch.Tensor) -> torch.Tensor:
    d_model = patched_final_resid.shape[-1]
    return chunked_kl_orig_to_patched(
        inputs.clean.final_resid.reshape(-1, d_model),
        patched_final_resid.reshape(-1, d_model),
        model_head(inputs.model),
        chunk_size=inputs.coefficients.kl_chunk_size,
        compile_kernel=inputs.coefficients.compile_kl,
    )


register_objective("local", _local, needs_full_run=False, local_mse_weight=lambda cfg: 1.0)
register_objective("e2e", _e2e)
register_objective("e2e_downstream", _e2e_downstream, uses_downstream_hooks=True)
