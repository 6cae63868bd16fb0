"""The forward and backward passes of one training step, for one SAE or several, on one token batch.

``StepPass.run(tokens)`` leaves each SAE's gradient in its parameters and returns each
SAE's training output; the run's trainer (``training.loop.trainer``) then has each SAE's
``E2ESAETrainer`` check its losses, update its dead-feature statistics and step its optimizer. A run of one SAE is the independent case with one entry. Every model call goes
through ``core.model_splice`` (HookedTransformer or Hugging Face model) and every loss term
through the run's registered objective (``training.objectives``).

- Independent: one shared prefix and clean run (and, for a KL objective, the clean
  log-probabilities, made once for every SAE's KL); then, SAE by SAE, the SAE's training
  forward pass on its hook's clean activation, the objective on its own continuation (exactly
  what a single run computes), and its backward pass (so one SAE's graph is freed before the
  next).
- Joint: one patched run from the shared prefix in which each SAE's training forward pass runs
  at its hook on the activation arriving there; the objective's joint form (one KL and
  downstream terms for all); one backward pass of the sum of every SAE's own terms and the
  shared ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from einops import rearrange
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_e2e_plugin.core.losses import clean_log_probs
from sae_e2e_plugin.core.model_splice import (
    model_head,
    prefix_for,
    run_clean_multi,
    run_joint_patched,
    run_prefix,
)
from sae_e2e_plugin.core.multi_splice import MultiCleanRun, MultiSplicePlan
from sae_e2e_plugin.core.positions import (
    PositionFilter,
    selected_rows,
    step_mask,
    with_reconstruction,
)
from sae_e2e_plugin.core.sparse_topk import (
    sparse_topk_training_forward,
    sparse_topk_unsupported,
)
from sae_e2e_plugin.training.objectives import (
    E2EParams,
    ObjectiveOutput,
    ResolvedObjective,
    combine_terms,
)
from sae_e2e_plugin.training.timing import NO_TIMING, PhaseTimer
from sae_e2e_plugin.transcoders.step import TranscoderStepInput, pack_transcoder_batch

_NO_TERMS = ObjectiveOutput(losses={}, metrics={})

Trainers = Mapping[str, SAETrainer[Any, Any]]
"""Each SAE's trainer by name: its SAE, scaler, statistics and coefficients."""
Outputs = dict[str, TrainStepOutput]
"""Each SAE's training output by name."""


@dataclass
class StepPass:
    """What a step of several SAEs needs, resolved once by the runner."""

    model: Any
    """The frozen language model (a ``HookedTransformer`` or a Hugging Face model)."""
    plan: MultiSplicePlan
    objective: ResolvedObjective
    kl_mse_balance: Literal["fixed", "adaptive"]
    positions: PositionFilter
    timer: PhaseTimer = NO_TIMING
    share_clean_log_probs: bool = True
    """Independent splice: make the clean log-probabilities once for every SAE's KL."""
    sparse_topk: bool = True
    """A TopK SAE's training forward pass over its k active latents (``core.sparse_topk``)."""
    weigh_sae_terms: Callable[[TrainStepOutput], TrainStepOutput] | None = None
    """Applied to each SAE's own output before its terms are combined (a data-parallel run
    weighs them by this rank's share of the selected rows)."""

    def run(
        self, tokens: torch.Tensor, trainers: Mapping[str, SAETrainer[Any, Any]]
    ) -> dict[str, TrainStepOutput]:
        """Each SAE's training output on ``tokens`` [batch, pos]; gradients left in the SAEs."""
        mask = step_mask(tokens, self.positions)
        with self.timer.phase("shared prefix"):
            prefix = run_prefix(self.model, tokens, self.plan)
        if self.plan.mode == "joint":
            return self._joint(prefix, mask, trainers)
        return self._independent(prefix, mask, trainers)

    def _independent(self, prefix: Any, mask: torch.Tensor | None, trainers: Trainers) -> Outputs:
        with self.timer.phase("clean continuation"):
            clean = run_clean_multi(
                self.model,
                prefix,
                self.plan,
                full=self.objective.needs_full_run,
                autocast=self._clean_autocast,
            )
        clean = self._with_log_probs(clean)
        outputs = {}
        for name, plan in self.plan.plans.items():
            trainer = trainers[name]
            own_clean = clean.for_sae(plan)
            with trainer.autocast_if_enabled:
                output, reconstruction = self._sae_forward(
                    trainer, own_clean.acts, mask, own_clean.target
                )
                own_prefix = prefix_for(prefix, clean, plan)
                terms = self.objective(
                    self.model, own_prefix, plan, own_clean, reconstruction, timer=self.timer
                )
            output = combine_terms(
                output, terms, self.objective.local_mse_weight, self.kl_mse_balance
            )
            with self.timer.phase("backward"):
                output.loss.backward()
            outputs[name] = output
        return outputs

    @property
    def _clean_autocast(self) -> torch.dtype | None:
        # An objective's own params may not have the field: its clean run stays as it is.
        return getattr(self.objective.params, "clean_autocast", None)

    def _with_log_probs(self, clean: MultiCleanRun) -> MultiCleanRun:
        params, final_resid = self.objective.params, clean.final_resid
        # Shared only where a KL reads them, and worth it only for a second SAE.
        if not self.share_clean_log_probs or len(self.plan.plans) < 2:
            return clean
        if not isinstance(params, E2EParams) or final_resid is None:
            return clean
        tokens = "batch pos d_model -> (batch pos) d_model"
        with self.timer.phase("clean log-probabilities"):
            log_probs = clean_log_probs(
                rearrange(final_resid, tokens),
                model_head(self.model, self.plan, autocast=self._clean_autocast),
                params.kl_chunk_size,
            )
        return dataclasses.replace(clean, log_probs=log_probs)

    def _joint(self, prefix: Any, mask: torch.Tensor | None, trainers: Trainers) -> Outputs:
        full = self.objective.needs_full_run
        clean = None
        if full:
            with self.timer.phase("clean continuation"), torch.no_grad():
                clean = run_clean_multi(
                    self.model, prefix, self.plan, inputs=False, autocast=self._clean_autocast
                )
        outputs: dict[str, TrainStepOutput] = {}

        def splice(name: str, act: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
            trainer = trainers[name]
            # A transcoder's target: the MLP output arriving in this patched run.
            target = None if self.plan.plans[name].hook_name_out is None else replaced
            with trainer.autocast_if_enabled:
                outputs[name], reconstruction = self._sae_forward(trainer, act, mask, target)
            return reconstruction

        splices = {name: partial(splice, name) for name in self.plan.plans}
        params = self.objective.params
        with self.timer.phase("patched continuation"):
            patched = run_joint_patched(
                self.model,
                prefix,
                self.plan,
                splices,
                full=full,
                checkpoint_blocks=bool(getattr(params, "checkpoint_blocks", False)),
            )
        shared = _NO_TERMS
        if clean is not None:  # the objective's joint form: its terms once, for every SAE
            plan = self.plan.prefix_plan
            shared = self.objective.joint_terms(
                self.model, plan, clean.for_joint(), patched, timer=self.timer
            )
        weight = self.objective.local_mse_weight
        own = {name: combine_terms(out, _NO_TERMS, weight) for name, out in outputs.items()}
        total = _sum([out.loss for out in own.values()] + list(shared.losses.values()))
        with self.timer.phase("backward"):
            total.backward()
        # Each SAE's log shows the shared terms (the same numbers for every SAE) next to its
        # own; its logged loss is the sum of both. The gradient came from ``total`` above.
        return {name: _with_shared(out, shared) for name, out in own.items()}

    def _sae_forward(
        self,
        trainer: SAETrainer[Any, Any],
        acts: torch.Tensor,
        mask: torch.Tensor | None,
        target: torch.Tensor | None = None,
    ) -> tuple[TrainStepOutput, torch.Tensor]:
        """The SAE's training output on ``acts`` [batch, pos, d_in] and its reconstruction on
        the model's scale (the unselected positions keep ``acts``).

        A transcoder also gets ``target`` [batch, pos, d_out], the MLP output its local MSE is
        measured against (scaled as its input is) and which its unselected positions keep."""
        sae = trainer.sae
        sae.train()
        scaler = trainer.activation_scaler
        fields: dict[str, Any] = {
            "sae_in": scaler(selected_rows(acts, mask).to(sae.device)),
            "dead_neuron_mask": trainer.dead_neurons,
            "coefficients": trainer.get_coefficients(),
            "n_training_steps": trainer.n_training_steps,
            "is_logging_step": trainer._is_logging_step(),
        }
        step_input = TrainStepInput(**fields)
        if target is not None:
            out_rows = scaler(selected_rows(target, mask).to(sae.device))
            step_input = TranscoderStepInput(**fields, sae_out_target=out_rows)
            acts = target  # what the replaced hook holds where nothing is spliced
        with self.timer.phase("SAE training forward"):
            output = self._training_forward(sae, step_input)
        if self.weigh_sae_terms is not None:
            output = self.weigh_sae_terms(output)
        rows = trainer.activation_scaler.unscale(output.sae_out).to(acts.device)
        if mask is None:
            shape = "(batch pos) d_in -> batch pos d_in"
            return output, rearrange(rows, shape, batch=acts.shape[0])
        return output, with_reconstruction(acts, mask, rows)

    def _training_forward(self, sae: Any, step_input: TrainStepInput) -> TrainStepOutput:
        if self.sparse_topk and sparse_topk_unsupported(sae) is None:
            return sparse_topk_training_forward(sae, step_input)
        return sae.training_forward_pass(step_input=step_input)


def local_rows(plan: MultiSplicePlan, name: str, batch: Any) -> torch.Tensor:
    """SAE ``name``'s rows of a local-phase batch (several hooks: ``{hook: [rows, width]}``, the
    rows of every hook from the same tokens): its input, or for a transcoder its input and its
    target packed side by side (``pack_transcoder_batch``), which its training step splits."""
    if not isinstance(batch, dict):
        return batch
    one = plan.plans[name]
    rows = batch[one.hook_name]
    if one.hook_name_out is None:
        return rows
    return pack_transcoder_batch(rows, batch[one.hook_name_out])


def _with_shared(output: TrainStepOutput, shared: ObjectiveOutput) -> TrainStepOutput:
    loss = output.loss.detach()
    for name, term in shared.losses.items():
        output.losses[name] = term.detach()
        loss = loss + term.detach()
    output.metrics.update(shared.metrics)
    output.loss = loss
    return output


def _sum(terms: list[torch.Tensor]) -> torch.Tensor:
    # Left to right from the first term, as a single run adds its terms (same float rounding).
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
