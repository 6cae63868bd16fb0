"""``E2ESAETrainer``: SAELens' ``SAETrainer`` whose step consumes whole token sequences.

SAETrainer keeps everything but the step: Adam, the LR schedule, the
coefficient warm-ups, dead-feature statistics, checkpoints and resume, wandb
logging and the progress bar. One step here is:

1. run the frozen model once up to the SAE's block (shared prefix, no grad);
2. continue it clean to get the SAE's input, p_orig and the clean downstream activations;
3. the SAE's own training forward pass (reconstruction, sparsity and auxiliary terms);
4. the objective: splice the reconstruction in, continue the model, KL (+ downstream MSE);
5. backward, clip, optimizer and scheduler steps.

With ``e2e_fraction < 1`` the steps before the switch (``training.schedule``) are SAETrainer's
own local step on activations from SAELens' buffer; the same optimizer, LR schedule and
counters carry on into the e2e steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer, SaveCheckpointFn
from tqdm.auto import tqdm

from sae_e2e_plugin.core.model_splice import model_facts, run_clean, run_prefix
from sae_e2e_plugin.core.multi_splice import MultiSplicePlan
from sae_e2e_plugin.core.positions import ALL_POSITIONS, PositionFilter, selected_rows, step_mask
from sae_e2e_plugin.core.splice import SplicePlan
from sae_e2e_plugin.run_files import TRAINER_STATE_FILENAME
from sae_e2e_plugin.training.checkpoints import (
    read_e2e_trainer_state,
    refuse_unsafe_trainer_state,
    staged_checkpoint,
)
from sae_e2e_plugin.training.config import E2ERunnerConfig
from sae_e2e_plugin.training.multi_step import MultiStepPass
from sae_e2e_plugin.training.objectives import ResolvedObjective
from sae_e2e_plugin.training.schedule import LocalData, Phase, PhasedData, plan_schedule
from sae_e2e_plugin.training.timing import NO_TIMING, PhaseTimer
from sae_e2e_plugin.training.training_log import (
    append_row,
    batch_l0,
    logged_terms,
    progress_summary,
    truncate_after,
)

ONE_SAE = "sae"
"""The name of a single-SAE run's one SAE in the step pass."""


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step when the loss is NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised at the start of a step after SIGINT/SIGTERM asked training to stop.

    The runner re-raises it with ``checkpoint`` set to the checkpoint it wrote (None when
    checkpointing is off).
    """

    checkpoint: Path | None = None


class E2ESAETrainer(SAETrainer[Any, Any]):
    """Trains an SAE on ``(batch, context_size)`` token batches with an end-to-end objective."""

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: TrainingSAE[Any],
        data_provider: Iterator[torch.Tensor],
        model: Any,
        plan: SplicePlan,
        e2e_cfg: E2ERunnerConfig[Any],
        objective: ResolvedObjective,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
        periodic_eval: Callable[[E2ESAETrainer], None] | None = None,
        training_log_path: Path | None = None,
        timer: PhaseTimer = NO_TIMING,
        positions: PositionFilter = ALL_POSITIONS,
        local_data: LocalData | None = None,
        sae_name: str | None = None,
    ) -> None:
        super().__init__(
            cfg=cfg, sae=sae, data_provider=data_provider, save_checkpoint_fn=save_checkpoint_fn
        )
        self.schedule = plan_schedule(
            e2e_cfg.training_tokens, e2e_cfg.train_batch_size_tokens, e2e_cfg.e2e_fraction
        )
        """Which steps are local and which end to end (``e2e_cfg.e2e_fraction``)."""
        self.tokens = data_provider
        """Token batches for e2e steps (and the normalisation estimate)."""
        self.local_data = local_data
        """Activation batches for the local steps before the switch (None: no local step)."""
        if self.schedule.local_steps > 0:
            if local_data is None:
                raise ValueError(
                    f"e2e_fraction={e2e_cfg.e2e_fraction} schedules {self.schedule.local_steps} "
                    "local steps, but the trainer was given no local_data (activation batches)."
                )
            self.data_provider = PhasedData(
                self.schedule, local_data, data_provider, lambda: self.n_steps_taken
            )
        self.saved_local_data: dict[str, Any] | None = None
        """The local data's position read from the checkpoint being resumed (the runner
        rebuilds the data streams from it)."""
        self.last_phase: Phase = self.schedule.phase(0)
        """The phase of the latest step (progress bar, wandb)."""
        self.model = freeze(model)
        """The frozen language model: a ``HookedTransformer`` or a Hugging Face model."""
        self.model_facts = model_facts(model)
        """Where tokens go and the vocabulary size (``core.model_splice.model_facts``)."""
        self.plan = plan
        self.e2e_cfg = e2e_cfg
        self.objective = objective
        """The run's objective, resolved once from ``e2e_cfg`` by the runner."""
        self.timer = timer
        """Times each phase of a step (``training.timing``); a no-op unless a benchmark sets one."""
        self.positions = positions
        """The positions the SAE reads and replaces (``seqpos_slice``, excluded token ids)."""
        self.sae_name = sae_name
        """The SAE's name in a run of several (``training.multi_trainer``); None alone."""
        self.step_pass = MultiStepPass(
            self.model,
            MultiSplicePlan.of_one(ONE_SAE, plan),
            objective,
            e2e_cfg.kl_mse_balance,
            positions,
            timer,
        )
        """An e2e step's forward and backward passes (``training.multi_step``), with this SAE
        as the one entry."""
        self.periodic_eval = periodic_eval
        """Called every ``eval_every_n_steps`` completed steps (evaluation on held-out tokens)."""
        self.n_sequences_consumed = 0
        """Token sequences drawn from the data provider so far (resume skips this many)."""
        self.n_steps_taken = 0
        """Completed steps. SAETrainer checkpoints before it counts the step it just took, so
        its saved ``n_training_steps`` lags by one; resume restores this count instead."""
        self.first_losses: dict[str, float] = {}
        """Each loss term of the first step this trainer took (for the end-of-run summary)."""
        self.last_losses: dict[str, float] = {}
        """Each loss term of the latest step."""
        self._last_row_time = time.perf_counter()
        """When the previous log row was written (or training started): a row's ``seconds``."""
        self.stop_requested = False
        """Set by a signal handler; the next step stops before touching any state."""
        self.last_checkpoint: Path | None = None
        """The latest checkpoint this trainer wrote (complete: see ``training.checkpoints``)."""
        self.training_log_path = training_log_path
        """If set, one JSON line per step is appended here: step, tokens, each loss term and
        the batch's L0 (to see whether the loss and L0 have settled)."""

    def fit(self) -> TrainingSAE[Any]:
        """Train until ``total_training_samples`` tokens have been consumed; return the SAE."""
        self.sae.to(self.cfg.device)
        self._last_row_time = time.perf_counter()
        if (
            self.sae.cfg.normalize_activations == "expected_average_only_in"
            and self.activation_scaler.scaling_factor is None
        ):
            # SAETrainer would read activations from the data provider; ours yields tokens.
            self.activation_scaler.estimate_scaling_factor(
                d_in=self.sae.cfg.d_in,
                data_provider=self._activation_batches(),
                n_batches_for_norm_estimate=self.cfg.n_batches_for_norm_estimate,
            )
        return super().fit()

    def step(self, batch: torch.Tensor) -> TrainStepOutput:
        """One training step: on a ``(batch, context_size)`` token batch in the e2e phase, on a
        ``[train_batch_size_tokens, d_in]`` activation batch in the local phase."""
        self.last_phase = self.schedule.phase(self.n_steps_taken)
        if self.last_phase == "local":
            output = self._local_step(batch)
        else:
            output = self._e2e_step(batch)
        self.n_steps_taken += 1
        self.last_losses = logged_terms(output)
        self.first_losses = self.first_losses or dict(self.last_losses)
        if self.training_log_path is not None:
            self._append_log_row(output)
        every = self.e2e_cfg.eval_every_n_steps
        if self.periodic_eval is not None and every > 0 and self.n_steps_taken % every == 0:
            self.periodic_eval(self)
        return output

    def _local_step(self, batch: torch.Tensor) -> TrainStepOutput:
        if batch.ndim != 2 or not batch.is_floating_point():
            raise ValueError(
                f"step {self.n_steps_taken} is a local step and expects activations of shape "
                f"(tokens, d_in), got {tuple(batch.shape)} of {batch.dtype}."
            )
        stop_if_requested(self)
        # SAELens' own local step: scaler, training forward, statistics, backward, clip, Adam.
        consumed = self.n_training_samples + self.cfg.train_batch_size_samples
        output = super().step(batch)
        # The schedule counts a step's tokens, whole sequences, as an e2e step does; the batch
        # holds only the selected positions' rows (seqpos_slice, excluded tokens, a rank's share).
        self.n_training_samples = consumed
        self._check_finite(output, before_update=False)
        return output

    def _e2e_step(self, batch: torch.Tensor) -> TrainStepOutput:
        if batch.ndim != 2 or batch.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"E2ESAETrainer.step expects integer tokens of shape (batch, context_size), "
                f"got {tuple(batch.shape)} of {batch.dtype}. Feed it ActivationsStore."
                "get_batch_tokens(...), not the activation buffer."
            )
        # An id outside the vocabulary would fail as an IndexError inside the embedding.
        low, high = (int(v) for v in torch.aminmax(batch))
        d_vocab = self.model_facts.d_vocab
        if low < 0 or high >= d_vocab:
            raise ValueError(
                f"token id {low if low < 0 else high} in this batch is outside the model's "
                f"vocabulary of d_vocab={d_vocab}; tokenize the data with the "
                "model's own tokenizer."
            )
        stop_if_requested(self)
        tokens = batch.to(self.model_facts.device)
        self.n_training_samples += tokens.numel()
        self.n_sequences_consumed += tokens.shape[0]
        return self._e2e_train_step(tokens)

    def _e2e_train_step(self, tokens: torch.Tensor) -> TrainStepOutput:
        # The step pass of every run (``training.multi_step``): this SAE is its one entry.
        return self.finish_e2e_step(self.step_pass.run(tokens, {ONE_SAE: self})[ONE_SAE])

    def finish_e2e_step(self, output: TrainStepOutput) -> TrainStepOutput:
        """After the step pass left the SAE's gradient: the NaN check, the dead-feature
        statistics, clipping and the optimizer and schedule steps."""
        self._check_finite(output)
        self._update_feature_statistics(output.feature_acts)
        self._apply_gradients()
        return output

    def global_losses(self, output: TrainStepOutput) -> TrainStepOutput:
        """The output's logged terms over the whole batch (data-parallel: means over ranks)."""
        return output

    def _append_log_row(self, output: TrainStepOutput) -> None:
        assert self.training_log_path is not None
        row: dict[str, Any] = {"step": self.n_steps_taken, "tokens": self.n_training_samples}
        row |= {"phase": self.last_phase} | self.last_losses | {"l0": batch_l0(output)}
        # Wall time since the previous row: the step with its data (the local phase's buffer
        # refills run the model) and any checkpoint or evaluation after the previous step.
        now = time.perf_counter()
        row["seconds"], self._last_row_time = round(now - self._last_row_time, 4), now
        append_row(self.training_log_path, row)

    def _check_finite(self, output: TrainStepOutput, before_update: bool = True) -> None:
        if torch.isfinite(output.loss).item():
            return
        terms = {name: float(value.detach()) for name, value in output.losses.items()}
        where = self.cfg.checkpoint_path or "(checkpointing is off)"
        # SAETrainer's local step updates the weights before its loss can be seen.
        when = "before" if before_update else "after"
        sae = "" if self.sae_name is None else f" of SAE {self.sae_name!r}"
        raise NonFiniteLossError(
            f"the training loss{sae} became {float(output.loss.detach())} at step "
            f"{self.n_training_steps} ({self.last_phase} phase; terms: {terms}). Training "
            f"stopped {when} this update; "
            f"the last checkpoint under {where} is intact. Lower lr, raise lr_warm_up_steps, "
            "or check the model's dtype."
        )

    def _update_feature_statistics(self, feature_acts: torch.Tensor) -> None:
        update_feature_statistics(self, feature_acts)

    def _apply_gradients(self) -> None:
        with self.timer.phase("optimizer step"):
            if self.e2e_cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.e2e_cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()

    def _activation_batches(self) -> Iterator[torch.Tensor]:
        """Activations at the SAE's hook, [tokens, d_in], for normalisation estimates."""
        while True:
            tokens = next(self.tokens).to(self.model_facts.device)
            self.n_sequences_consumed += tokens.shape[0]
            with torch.no_grad():
                prefix = run_prefix(self.model, tokens, self.plan)
                acts = run_clean(self.model, prefix, self.plan, full=False).acts
            yield selected_rows(acts, step_mask(tokens, self.positions))

    def save_checkpoint(
        self,
        checkpoint_name: str,
        base_path: Path | str | None = None,
        wandb_aliases: list[str] | None = None,
    ) -> None:
        """SAETrainer's checkpoint, written atomically: staged, marked complete, renamed."""
        base = base_path if base_path is not None else self.cfg.checkpoint_path
        if base is None:  # no folder: SAETrainer only uploads to wandb (if on)
            super().save_checkpoint(checkpoint_name, None, wandb_aliases)
            return
        marker = {
            "n_training_samples": self.n_training_samples,
            "n_steps_taken": self.n_steps_taken,
            "objective": self.objective.name,
            "next_phase": self.schedule.phase(self.n_steps_taken),
        }
        with staged_checkpoint(Path(base), checkpoint_name, marker) as staging:
            super().save_checkpoint(staging.name, base, wandb_aliases)
        self.last_checkpoint = Path(base) / checkpoint_name

    def save_trainer_state(self, checkpoint_path: Path) -> None:
        """SAETrainer's state plus how many token sequences were consumed and the objective."""
        super().save_trainer_state(checkpoint_path)
        state = {
            "n_sequences_consumed": self.n_sequences_consumed,
            "n_steps_taken": self.n_steps_taken,
            "objective": self.objective.name,
            "first_e2e_step": self.schedule.first_e2e_step,
            "next_phase": self.schedule.phase(self.n_steps_taken),
            "local_data": None if self.local_data is None else self.local_data.state(),
        }
        (Path(checkpoint_path) / TRAINER_STATE_FILENAME).write_text(json.dumps(state))

    def load_trainer_state(self, checkpoint_path: Path | str) -> None:
        """Restore SAETrainer's state and the token-stream position."""
        refuse_unsafe_trainer_state(Path(checkpoint_path), self.cfg.device)
        super().load_trainer_state(checkpoint_path)
        state = read_e2e_trainer_state(
            Path(checkpoint_path), self.objective.name, self.schedule.first_e2e_step
        )
        self.saved_local_data = state.get("local_data")
        self.n_sequences_consumed = int(state["n_sequences_consumed"])
        self.n_steps_taken = self.n_training_steps = int(state["n_steps_taken"])
        truncate_after(self.training_log_path, self.n_steps_taken)
        # Checkpoints already written before the interruption are not written again.
        self.checkpoint_thresholds = [
            t for t in self.checkpoint_thresholds if t >= self.n_training_samples
        ]

    @torch.no_grad()
    def _update_pbar(
        self, step_output: TrainStepOutput, pbar: tqdm, update_interval: int = 10
    ) -> None:
        # Advance every step (e2e steps are slow); summarise the per-hook terms in one number.
        pbar.update(self.cfg.train_batch_size_samples)
        switched = self.n_training_steps == self.schedule.first_e2e_step + 1
        if self.n_training_steps % update_interval == 0 or self.n_training_steps == 1 or switched:
            # The spliced phase is named by its objective: "e2e" would mislabel loss="local".
            label = self.objective.name if self.last_phase == "e2e" else "local"
            pbar.set_description(
                f"{self.n_training_steps}| {label} | {progress_summary(step_output)}"
            )

    @torch.no_grad()
    def build_train_step_log_dict(
        self, output: TrainStepOutput, n_training_samples: int
    ) -> dict[str, Any]:
        """SAETrainer's wandb row plus the phase of the step (1: end to end, 0: local)."""
        row = super().build_train_step_log_dict(output, n_training_samples)
        return row | {"details/e2e_phase": int(self.last_phase == "e2e")}


def stop_if_requested(trainer: Any) -> None:
    """Raise ``TrainingInterrupted`` before a step when a signal asked training to stop."""
    if trainer.stop_requested:
        raise TrainingInterrupted(
            f"training stopped on request before step {trainer.n_training_steps}"
        )


def freeze(model: Any) -> Any:
    """Put the language model in eval mode with no parameter requiring grad."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def update_feature_statistics(trainer: SAETrainer[Any, Any], feature_acts: torch.Tensor) -> None:
    """SAETrainer._train_step's bookkeeping (firing counts for dead features) for a step that
    does not go through it."""
    firing = feature_acts.bool().float()
    did_fire = firing.sum(-2).bool()
    if did_fire.is_sparse:
        did_fire = did_fire.to_dense()
    trainer.n_forward_passes_since_fired += 1
    trainer.n_forward_passes_since_fired[did_fire] = 0
    trainer.act_freq_scores += firing.sum(0)
    # Rows the SAE saw: every token, or the positions seqpos_slice / excluded tokens select.
    trainer.n_frac_active_samples += firing.shape[0]
