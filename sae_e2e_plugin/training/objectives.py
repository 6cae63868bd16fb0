"""The registry of training objectives: ``loss="local" | "e2e" | "e2e_downstream"`` and user ones.

An objective turns one step's runs of the model into weighted loss terms. The
trainer adds them to the SAE's own sparsity and auxiliary terms (from its
``calculate_aux_loss``). Objectives are registered by name, so a user can add one
with ``register_objective`` and select it with ``loss="<name>"``.

Each objective declares the config fields it reads as a small frozen dataclass (its
``params``): when a run is built, ``resolve_objective`` looks the objective up once and
reads those fields from the config, so a misspelt field fails then, not at the first step.
The trainer is handed the ``ResolvedObjective`` and never looks the name up again.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Literal, TypeVar

import torch
from einops import rearrange
from sae_lens.saes.sae import TrainStepOutput

from sae_e2e_plugin.core.losses import (
    adaptive_kl_mse,
    chunked_kl_orig_to_patched,
    downstream_loss,
    mse_mean,
)
from sae_e2e_plugin.core.model_splice import model_head, run_patched
from sae_e2e_plugin.core.splice import CleanRun, PatchedRun, SplicePlan
from sae_e2e_plugin.training.timing import NO_TIMING, PhaseTimer

P_co = TypeVar("P_co", covariant=True)


@dataclass(frozen=True)
class NoParams:
    """The params of an objective that reads no config field."""


@dataclass(frozen=True)
class E2EParams:
    """The config fields "e2e" reads."""

    kl_coefficient: float
    """β_kl, the weight of KL(p_orig ‖ p_patched)."""
    kl_chunk_size: int
    """Tokens whose logits are made at once."""
    compile_kl: bool
    """Whether the KL's elementwise work runs through ``torch.compile``."""
    checkpoint_blocks: bool
    """Whether the patched run recomputes the later blocks in the backward pass."""
    clean_run_dtype: str | None
    """The dtype the clean run's targets-only part runs in under autocast (None: the model's)."""

    @property
    def clean_autocast(self) -> torch.dtype | None:
        """``clean_run_dtype`` as a torch dtype."""
        return None if self.clean_run_dtype is None else getattr(torch, self.clean_run_dtype)


@dataclass(frozen=True)
class E2EDownstreamParams(E2EParams):
    """The config fields "e2e_downstream" reads."""

    downstream_coefficient: float
    """β_ds, the total weight of the downstream MSE terms."""


@dataclass(frozen=True)
class ObjectiveInputs(Generic[P_co]):
    """What an objective sees in one training step."""

    model: Any
    """The frozen language model (a ``HookedTransformer`` or a Hugging Face model)."""
    prefix: Any
    """The shared state entering the SAE's block (pass it to ``core.model_splice.run_patched``)."""
    plan: SplicePlan
    """The SAE's hook and the downstream hooks."""
    clean: CleanRun
    """The clean run: SAE input, final residual, downstream activations (no grad)."""
    reconstruction: torch.Tensor | None
    """[batch, pos, d_in] the SAE's output on the model's own scale (carries grad); None in a
    joint form's inputs (every SAE's reconstruction is already in the patched run)."""
    params: P_co
    """The config fields the objective declared (an instance of its ``params`` dataclass)."""
    timer: PhaseTimer = NO_TIMING
    """Wrap the objective's parts in ``timer.phase(name)`` (see ``training.timing``)."""


@dataclass
class ObjectiveOutput:
    """An objective's contribution to one step."""

    losses: dict[str, torch.Tensor]
    """Weighted terms, added to the loss and logged as ``losses/<name>``."""
    metrics: dict[str, torch.Tensor]
    """Unweighted values, logged as ``metrics/<name>``."""


ObjectiveFn = Callable[[ObjectiveInputs[Any]], ObjectiveOutput]
TermsFn = Callable[[ObjectiveInputs[Any], PatchedRun], ObjectiveOutput]
"""An objective's joint form: its terms from a patched run made by the caller."""


@dataclass(frozen=True)
class Objective:
    """A registered objective."""

    name: str
    fn: ObjectiveFn
    params: type
    """Frozen dataclass whose field names are the config fields ``fn`` reads."""
    needs_full_run: bool
    """Whether the clean run must reach the logits (False: stop after the SAE's block)."""
    uses_downstream_hooks: bool
    """Whether the clean and patched runs record the downstream hooks."""
    local_mse_weight: float | None
    """Weight of SAELens' own reconstruction MSE; None: the config's ``local_mse_coefficient``."""
    terms: TermsFn | None = None
    """The joint form (several SAEs in one patched run); None: the objective has none."""


@dataclass(frozen=True)
class ResolvedObjective:
    """An objective bound to one run's config: what the trainer calls every step."""

    objective: Objective
    params: Any
    """The objective's ``params`` read from the config."""
    local_mse_weight: float
    """Weight of SAELens' reconstruction MSE at the SAE's hook in this run."""

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def needs_full_run(self) -> bool:
        return self.objective.needs_full_run

    @property
    def uses_downstream_hooks(self) -> bool:
        return self.objective.uses_downstream_hooks

    def __call__(
        self,
        model: Any,
        prefix: Any,
        plan: SplicePlan,
        clean: CleanRun,
        reconstruction: torch.Tensor,
        timer: PhaseTimer = NO_TIMING,
    ) -> ObjectiveOutput:
        """The objective's terms for one step."""
        inputs = ObjectiveInputs(model, prefix, plan, clean, reconstruction, self.params, timer)
        return self.objective.fn(inputs)

    def joint_terms(
        self,
        model: Any,
        plan: SplicePlan,
        clean: CleanRun,
        patched: PatchedRun,
        timer: PhaseTimer = NO_TIMING,
    ) -> ObjectiveOutput:
        """The terms of a patched run with several SAEs spliced in (the joint form)."""
        assert self.objective.terms is not None, f"loss={self.name!r} has no joint form"
        inputs = ObjectiveInputs(model, None, plan, clean, None, self.params, timer)
        return self.objective.terms(inputs, patched)


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(
    name: str,
    fn: ObjectiveFn,
    *,
    params: type = NoParams,
    needs_full_run: bool = True,
    uses_downstream_hooks: bool = False,
    local_mse_weight: float | None = None,
    terms: TermsFn | None = None,
) -> Objective:
    """Add an objective under ``name``; select it with ``E2ERunnerConfig(loss=name)``.

    ``params`` is a dataclass whose field names are the config fields ``fn`` reads
    (``inputs.params.<field>``); they are read once when the run is built. ``local_mse_weight``
    is the weight of SAELens' reconstruction MSE at the SAE's hook; None (the default) uses the
    config's ``local_mse_coefficient``. ``terms`` is the joint form (``TermsFn``), which a
    ``splice="joint"`` run of several SAEs needs. Registering a name twice raises, as SAELens'
    own registries do.
    """
    if name in _OBJECTIVES:
        raise ValueError(f"an objective named {name!r} is already registered.")
    if not (isinstance(params, type) and dataclasses.is_dataclass(params)):
        raise ValueError(
            f"register_objective({name!r}): params={params!r} is not a dataclass type; declare "
            "the config fields the objective reads as a @dataclass(frozen=True)."
        )
    objective = Objective(
        name, fn, params, needs_full_run, uses_downstream_hooks, local_mse_weight, terms
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


def resolve_objective(cfg: Any) -> ResolvedObjective:
    """The objective named by ``cfg.loss``, with its params read from ``cfg``.

    Raises ValueError for an unknown name, or for a params field the config does not have
    (naming the field and the closest config fields).
    """
    objective = get_objective(cfg.loss)
    values = {}
    for field in dataclasses.fields(objective.params):
        if not hasattr(cfg, field.name):
            known = [f.name for f in dataclasses.fields(cfg)]
            close = difflib.get_close_matches(field.name, known, n=2)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"loss={cfg.loss!r} reads the config field {field.name!r} (a field of its params "
                f"{objective.params.__name__}), but {type(cfg).__name__} has no such field.{hint}"
            )
        values[field.name] = getattr(cfg, field.name)
    weight = objective.local_mse_weight
    return ResolvedObjective(
        objective=objective,
        params=objective.params(**values),
        local_mse_weight=cfg.local_mse_coefficient if weight is None else weight,
    )


def combine_terms(
    output: TrainStepOutput,
    terms: ObjectiveOutput,
    local_mse_weight: float,
    balance: Literal["fixed", "adaptive"] = "fixed",
) -> TrainStepOutput:
    """The SAE's training output with SAELens' reconstruction MSE swapped for the objective's terms.

    Sparsity and auxiliary terms (including e.g. matryoshka's inner reconstruction losses)
    stay as the architecture defines them. ``balance="adaptive"`` replaces the objective's
    ``kl_loss`` and the MSE by the halves of ``adaptive_kl_mse`` (logged as ``kl_loss`` and
    ``mse_loss``, α as ``metrics/kl_mse_alpha``); ``local_mse_weight`` is 0 then.
    """
    mse = output.losses.get("mse_loss")
    if balance == "adaptive":
        terms = _adaptive_terms(terms, mse)
    loss = output.loss
    if mse is not None and local_mse_weight != 1.0:
        loss = _loss_without_full_mse(output, mse, local_mse_weight)
        output.metrics["local_mse"] = mse.detach()
        if local_mse_weight == 0.0:
            del output.losses["mse_loss"]
        else:
            output.losses["mse_loss"] = local_mse_weight * mse
    for name, term in terms.losses.items():
        # With a device_map the objective's terms sit where the model's head does.
        loss = loss + term.to(loss.device)
        output.losses[name] = term
    output.metrics.update(terms.metrics)
    output.loss = loss
    return output


def _adaptive_terms(terms: ObjectiveOutput, mse: torch.Tensor | None) -> ObjectiveOutput:
    kl = terms.losses.get("kl_loss")
    if kl is None or mse is None:
        raise ValueError(
            "kl_mse_balance='adaptive' needs a 'kl_loss' term from the objective and SAELens' "
            f"'mse_loss' from the SAE; got objective terms {sorted(terms.losses)} and an MSE "
            f"{'present' if mse is not None else 'missing'}. Use kl_mse_balance='fixed'."
        )
    kl_half, mse_half, alpha = adaptive_kl_mse(kl, mse)
    losses = dict(terms.losses) | {"kl_loss": kl_half, "mse_loss": mse_half}
    return ObjectiveOutput(losses=losses, metrics=terms.metrics | {"kl_mse_alpha": alpha})


def _loss_without_full_mse(
    output: TrainStepOutput, mse: torch.Tensor, weight: float
) -> torch.Tensor:
    # Re-add the terms rather than subtract the MSE: on models with large activations
    # the MSE is ~1e6 and ``loss - mse`` would lose the small terms to float32 rounding.
    others = [value for name, value in output.losses.items() if name != "mse_loss"]
    total = sum(output.losses.values(), torch.zeros_like(output.loss))
    if torch.allclose(total.detach(), output.loss.detach(), rtol=1e-5, atol=1e-6):
        return sum(others, weight * mse)
    # The architecture's loss has terms outside its losses dict: keep them.
    return output.loss - (1.0 - weight) * mse


def _local(inputs: ObjectiveInputs[NoParams]) -> ObjectiveOutput:
    # SAELens' own MSE (kept at weight 1) is the whole objective.
    return ObjectiveOutput(losses={}, metrics={})


def _local_terms(inputs: ObjectiveInputs[NoParams], patched: PatchedRun) -> ObjectiveOutput:
    return _local(inputs)


def _e2e_terms(inputs: ObjectiveInputs[E2EParams], patched: PatchedRun) -> ObjectiveOutput:
    kl = _kl(inputs, patched.final_resid)
    return ObjectiveOutput(
        losses={"kl_loss": inputs.params.kl_coefficient * kl},
        metrics={"kl_orig_patched": kl.detach()},
    )


def _e2e_downstream_terms(
    inputs: ObjectiveInputs[E2EDownstreamParams], patched: PatchedRun
) -> ObjectiveOutput:
    params = inputs.params
    kl = _kl(inputs, patched.final_resid)
    terms = downstream_loss(
        patched.downstream, inputs.clean.downstream, params.downstream_coefficient
    )
    losses = {"kl_loss": params.kl_coefficient * kl}
    losses |= {f"downstream_mse_loss/{name}": term for name, term in terms.items()}
    metrics = {"kl_orig_patched": kl.detach()}
    for name in terms:
        raw = mse_mean(patched.downstream[name].detach(), inputs.clean.downstream[name])
        metrics[f"downstream_mse/{name}"] = raw
    return ObjectiveOutput(losses=losses, metrics=metrics)


def _spliced(terms: TermsFn) -> ObjectiveFn:
    """The objective of one SAE: its reconstruction spliced into its own patched run, then
    ``terms`` of that run."""
    return partial(_run_then, terms=terms)


def _run_then(inputs: ObjectiveInputs[E2EParams], *, terms: TermsFn) -> ObjectiveOutput:
    assert inputs.reconstruction is not None
    with inputs.timer.phase("patched continuation"):
        patched = run_patched(
            inputs.model,
            inputs.prefix,
            inputs.plan,
            inputs.reconstruction,
            checkpoint_blocks=inputs.params.checkpoint_blocks,
        )
    return terms(inputs, patched)


def _kl(inputs: ObjectiveInputs[E2EParams], patched_final_resid: torch.Tensor) -> torch.Tensor:
    assert inputs.clean.final_resid is not None  # needs_full_run: the clean run reached the end
    tokens = "batch pos d_model -> (batch pos) d_model"
    clean = inputs.clean.log_probs
    params = inputs.params
    with inputs.timer.phase("KL"):
        return chunked_kl_orig_to_patched(
            rearrange(inputs.clean.final_resid, tokens) if clean is None else clean,
            rearrange(patched_final_resid, tokens),
            model_head(inputs.model, inputs.plan),
            chunk_size=params.kl_chunk_size,
            compile_kernel=params.compile_kl,
            orig_to_logits=model_head(inputs.model, inputs.plan, autocast=params.clean_autocast),
        )


register_objective("local", _local, needs_full_run=False, local_mse_weight=1.0, terms=_local_terms)
register_objective("e2e", _spliced(_e2e_terms), params=E2EParams, terms=_e2e_terms)
register_objective(
    "e2e_downstream",
    _spliced(_e2e_downstream_terms),
    params=E2EDownstreamParams,
    uses_downstream_hooks=True,
    terms=_e2e_downstream_terms,
)
