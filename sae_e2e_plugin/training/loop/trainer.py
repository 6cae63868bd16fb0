"""``E2ETrainer``: the one training loop, for one SAE or several trained in lockstep.

Like SAELens' ``MultiSAETrainer`` it holds one ``SAETrainer`` per SAE — an ``E2ESAETrainer``
(``training.loop.sae_trainer``), which owns that SAE's Adam, schedules, activation scaler and
statistics. A step draws one batch for all SAEs: in the e2e phase the step pass
(``training.loop.step_pass``) runs the model once and leaves each SAE's gradient, then each SAE
finishes its step; in the local phase of a schedule each SAE takes SAELens' own step on its
hook's activations. A single-SAE run is the one-entry case, with today's single-SAE layouts
(``one_sae_layout``): its checkpoint folder holds SAETrainer's files directly, and its log rows
and wandb keys carry no SAE name. A checkpoint is one complete-or-absent folder
(``training.loop.checkpoints.staged_checkpoint``) holding each SAE's SAETrainer files (several:
``<checkpoint>/<name>/``) and the run's position (``e2e_trainer_state.json``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer, SaveCheckpointFn
from tqdm.auto import tqdm

from sae_e2e_plugin.core.model_splice import model_facts, run_clean_multi, run_prefix
from sae_e2e_plugin.core.positions import selected_rows, step_mask
from sae_e2e_plugin.run_files import TRAINER_STATE_FILENAME
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig
from sae_e2e_plugin.training.loop.checkpoints import (
    read_run_state,
    refuse_unsafe_trainer_state,
    staged_checkpoint,
)
from sae_e2e_plugin.training.loop.sae_trainer import (
    DataParallelE2ESAETrainer,
    E2ESAETrainer,
    TrainingInterrupted,
    freeze,
)
from sae_e2e_plugin.training.loop.schedule import LocalData, Phase, plan_schedule
from sae_e2e_plugin.training.loop.step_pass import StepPass, local_rows
from sae_e2e_plugin.training.loop.training_log import (
    append_row,
    batch_l0,
    logged_terms,
    progress_summary,
    truncate_after,
)
from sae_e2e_plugin.training.parallel.data_parallel import any_rank_stops, weigh_by_rows
from sae_e2e_plugin.training.parallel.distributed import (
    DistributedContext,
    barrier,
    broadcast_from_main,
    rank_share,
)


class E2ETrainer:
    """Trains ``saes`` (by name) on ``(batch, context_size)`` token batches, one step for all."""

    def __init__(
        self,
        cfg: SAETrainerConfig,
        saes: Mapping[str, TrainingSAE[Any]],
        data_provider: Iterator[torch.Tensor],
        step_pass: StepPass,
        e2e_cfg: E2ERunnerConfig[Any],
        *,
        one_sae_layout: bool = False,
        training_log_path: Path | None = None,
        periodic_eval: Callable[[E2ETrainer], None] | None = None,
        local_data: LocalData | None = None,
        context: DistributedContext | None = None,
        save_checkpoint_fn: SaveCheckpointFn | None = None,
    ) -> None:
        if one_sae_layout and len(saes) != 1:
            raise ValueError(f"one_sae_layout is for a run of one SAE, not of {list(saes)}")
        self.cfg = cfg
        self.e2e_cfg = e2e_cfg
        self.schedule = plan_schedule(
            cfg.total_training_samples, cfg.train_batch_size_samples, e2e_cfg.e2e_fraction
        )
        """Which steps are local and which end to end (``training.loop.schedule``)."""
        self.local_data = local_data
        """Activation batches for the local steps (several SAEs: ``{hook: [rows, d_in]}``;
        None: no local step)."""
        if self.schedule.local_steps > 0 and local_data is None:
            raise ValueError(
                f"e2e_fraction={e2e_cfg.e2e_fraction} schedules {self.schedule.local_steps} "
                "local steps, but the trainer was given no local_data (activation batches)."
            )
        self.saved_local_data: dict[str, Any] | None = None
        """The local data's position read from the checkpoint being resumed."""
        self.last_phase: Phase = self.schedule.phase(0)
        self.one_sae_layout = one_sae_layout
        """A single-SAE run's layouts: flat checkpoints, log rows and wandb keys without a name."""
        self.saes = dict(saes)
        self.tokens = data_provider
        self.step_pass = step_pass
        """The step's forward and backward passes (model, splice plan, objective)."""
        self.model = freeze(step_pass.model)
        self.model_facts = model_facts(self.model)
        """Where token ids go and the vocabulary size."""
        self.context = context
        """This rank's place in the process group (None: one process)."""
        if context is not None and not step_pass.positions.selects_all:
            # With excluded ids the ranks select different numbers of rows.
            step_pass.weigh_sae_terms = lambda output: weigh_by_rows(output, context)
        self.trainers = {name: self._sae_trainer(name, sae) for name, sae in saes.items()}
        """One SAELens ``SAETrainer`` per SAE (``E2ESAETrainer``; data-parallel:
        ``DataParallelE2ESAETrainer``)."""
        self.save_checkpoint_fn = save_checkpoint_fn
        """Called with each staged checkpoint folder (the runner adds its config and store)."""
        self.n_training_steps = 0
        self.n_steps_taken = 0
        """Completed steps (``n_training_steps`` is counted after the checkpoint of a step)."""
        self.n_training_samples = 0
        self.n_sequences_consumed = 0
        """Token sequences drawn from the data provider so far (resume skips this many)."""
        self.checkpoint_thresholds: list[int] = []
        if cfg.n_checkpoints > 0:
            every = math.ceil(cfg.total_training_samples / (cfg.n_checkpoints + 1))
            self.checkpoint_thresholds = list(range(0, cfg.total_training_samples, every))[1:]
        self.training_log_path = training_log_path
        """One JSON line per step: step, tokens, phase, each SAE's terms and L0, seconds."""
        self.periodic_eval = periodic_eval
        """Called every ``eval_every_n_steps`` completed steps (held-out evaluation)."""
        self.stop_requested = False
        """Set by a signal handler; the next step stops before touching any state."""
        self.last_checkpoint: Path | None = None
        """The latest checkpoint written (complete: see ``training.loop.checkpoints``)."""
        self.first_losses: dict[str, dict[str, float]] = {}
        """Each SAE's loss terms on the first step this trainer took (end-of-run summary)."""
        self.last_losses: dict[str, dict[str, float]] = {}
        """Each SAE's loss terms on the latest step."""
        self._last_row_time = time.perf_counter()

    def _sae_trainer(self, name: str, sae: TrainingSAE[Any]) -> E2ESAETrainer:
        settings: dict[str, Any] = {
            "max_grad_norm": self.e2e_cfg.max_grad_norm,
            "fused_adam": self.e2e_cfg.fused_adam,
            "name": None if self.one_sae_layout else name,
            "timer": self.step_pass.timer,
        }
        if self.context is None:
            return E2ESAETrainer(self.cfg, sae, **settings)
        return DataParallelE2ESAETrainer(self.cfg, sae, context=self.context, **settings)

    def _key(self, name: str, key: str) -> str:
        return key if self.one_sae_layout else f"{name}/{key}"

    def fit(self) -> dict[str, TrainingSAE[Any]]:
        """Train every SAE until ``total_training_samples`` tokens; return them by name."""
        for sae in self.saes.values():
            sae.to(self.cfg.device)
            if self.context is not None:  # every rank starts from rank 0's SAEs
                broadcast_from_main(list(sae.state_dict().values()), self.context)
        self._estimate_scaling_factors()
        pbar = tqdm(
            total=self.cfg.total_training_samples,
            initial=self.n_training_samples,
            desc="Training SAE" if self.one_sae_layout else f"Training {len(self.saes)} SAEs",
        )
        self._last_row_time = time.perf_counter()
        while self.n_training_samples < self.cfg.total_training_samples:
            self._log_sparsity({n: t.maybe_reset_sparsity() for n, t in self.trainers.items()})
            local = self.schedule.phase(self.n_steps_taken) == "local"
            outputs = self.step(next(self.local_data if local else self.tokens))  # type: ignore[arg-type]
            if self.cfg.logger.log_to_wandb:
                self._log_to_wandb(outputs)
            self._checkpoint_if_needed()
            for trainer in self.trainers.values():
                trainer.n_training_steps += 1
            self.n_training_steps += 1
            self._update_pbar(outputs, pbar)
        pbar.close()
        self._log_sparsity({n: t.full_sparsity_window_log() for n, t in self.trainers.items()})
        self._finish()
        if self.cfg.save_final_checkpoint:
            self.save_checkpoint(checkpoint_name=f"final_{self.n_training_samples}")
        return self.saes

    def step(self, batch: Any) -> dict[str, TrainStepOutput]:
        """One step of every SAE: on a ``(batch, context_size)`` token batch in the e2e phase,
        on activations in the local phase (``[rows, d_in]``; several SAEs: by hook)."""
        self.last_phase = self.schedule.phase(self.n_steps_taken)
        if self.context is not None:  # all ranks stop before the same step
            self.stop_requested = any_rank_stops(self.stop_requested, self.context, self.cfg.device)
        if self.stop_requested:
            raise TrainingInterrupted(
                f"training stopped on request before step {self.n_training_steps}"
            )
        for trainer in self.trainers.values():
            trainer.last_phase = self.last_phase
        if self.last_phase == "local":
            outputs = self._local_step(batch)
        else:
            outputs = self._e2e_step(batch)
        self.n_steps_taken += 1
        self.last_losses = {name: logged_terms(output) for name, output in outputs.items()}
        self.first_losses = self.first_losses or dict(self.last_losses)
        if self.training_log_path is not None:
            self._append_log_row(outputs)
        every = self.e2e_cfg.eval_every_n_steps
        if self.periodic_eval is not None and every > 0 and self.n_steps_taken % every == 0:
            self.periodic_eval(self)
        return outputs

    def _local_step(self, batch: Any) -> dict[str, TrainStepOutput]:
        n_tokens = self.cfg.train_batch_size_samples
        outputs = {}
        for name, trainer in self.trainers.items():
            rows = local_rows(self.step_pass.plan, name, batch)
            outputs[name] = trainer.local_step(rows, n_tokens)
        self.n_training_samples += n_tokens
        return outputs

    def _e2e_step(self, tokens: torch.Tensor) -> dict[str, TrainStepOutput]:
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"E2ETrainer.step expects integer tokens of shape (batch, context_size), "
                f"got {tuple(tokens.shape)} of {tokens.dtype}. Feed it ActivationsStore."
                "get_batch_tokens(...), not the activation buffer."
            )
        # An id outside the vocabulary would fail as an IndexError inside the embedding.
        low, high = (int(v) for v in torch.aminmax(tokens))
        d_vocab = self.model_facts.d_vocab
        if low < 0 or high >= d_vocab:
            raise ValueError(
                f"token id {low if low < 0 else high} in this batch is outside the model's "
                f"vocabulary of d_vocab={d_vocab}; tokenize the data with the model's own "
                "tokenizer."
            )
        tokens = tokens.to(self.model_facts.device)
        self.n_sequences_consumed += tokens.shape[0]
        self.n_training_samples += tokens.numel()
        for trainer in self.trainers.values():
            trainer.n_training_samples += tokens.numel()
        rows = tokens if self.context is None else rank_share(tokens, self.context)
        outputs = self.step_pass.run(rows, self.trainers)
        for name, trainer in self.trainers.items():
            outputs[name] = trainer.global_losses(trainer.finish_e2e_step(outputs[name]))
        return outputs

    def _log_sparsity(self, logs: Mapping[str, dict[str, Any]]) -> None:
        row = {self._key(name, k): v for name, log in logs.items() for k, v in log.items()}
        if row and self.cfg.logger.log_to_wandb:
            wandb.log(row, step=self.n_training_steps)

    @torch.no_grad()
    def _log_to_wandb(self, outputs: Mapping[str, TrainStepOutput]) -> None:
        """SAETrainer's wandb row of every SAE (several: each key under ``<name>/``), and its
        weight histograms every ``eval_every_n_wandb_logs`` logs."""
        logger, step = self.cfg.logger, self.n_training_steps
        if (step + 1) % logger.wandb_log_frequency == 0:
            row: dict[str, Any] = {"details/n_training_samples": self.n_training_samples}
            for name, trainer in self.trainers.items():
                log = trainer.build_train_step_log_dict(outputs[name], self.n_training_samples)
                row |= {self._key(name, key): value for key, value in log.items()}
            wandb.log(row, step=step)
        if (step + 1) % (logger.wandb_log_frequency * logger.eval_every_n_wandb_logs) == 0:
            histograms = {
                self._key(name, key): wandb.Histogram(values)  # type: ignore[arg-type]
                for name, sae in self.saes.items()
                for key, values in sae.log_histograms().items()
            }
            if histograms:
                wandb.log(histograms, step=step)

    def _append_log_row(self, outputs: Mapping[str, TrainStepOutput]) -> None:
        assert self.training_log_path is not None
        row: dict[str, Any] = {"step": self.n_steps_taken, "tokens": self.n_training_samples}
        row["phase"] = self.last_phase
        for name, output in outputs.items():
            terms = self.last_losses[name] | {"l0": batch_l0(output)}
            row |= {self._key(name, term): value for term, value in terms.items()}
        # Wall time since the previous row: the step with its data (the local phase's buffer
        # refills run the model) and any checkpoint or evaluation after the previous step.
        now = time.perf_counter()
        row["seconds"], self._last_row_time = round(now - self._last_row_time, 4), now
        append_row(self.training_log_path, row)

    @torch.no_grad()
    def _update_pbar(self, outputs: Mapping[str, TrainStepOutput], pbar: tqdm) -> None:
        # Advance every step (e2e steps are slow); describe the terms every 10 steps and at the
        # switch. The spliced phase is named by its objective: "e2e" would mislabel "local".
        pbar.update(self.cfg.train_batch_size_samples)
        step = self.n_training_steps
        if step % 10 == 0 or step == 1 or step == self.schedule.first_e2e_step + 1:
            label = self.step_pass.objective.name if self.last_phase == "e2e" else "local"
            terms = " || ".join(
                f"{name}: {progress_summary(output)}" for name, output in outputs.items()
            )
            if self.one_sae_layout:
                terms = progress_summary(next(iter(outputs.values())))
            pbar.set_description(f"{step}| {label} | {terms}")

    @torch.no_grad()
    def _estimate_scaling_factors(self) -> None:
        """Each scaler that needs an estimate gets one from the same token batches (as many as
        ``n_batches_for_norm_estimate``), read at its SAE's hook."""
        needs = [
            name
            for name, trainer in self.trainers.items()
            if trainer.sae.cfg.normalize_activations == "expected_average_only_in"
            and trainer.activation_scaler.scaling_factor is None
        ]
        if not needs:
            return
        plan, positions = self.step_pass.plan, self.step_pass.positions
        batches: dict[str, list[torch.Tensor]] = {name: [] for name in needs}
        for _ in range(self.cfg.n_batches_for_norm_estimate):
            tokens = next(self.tokens).to(self.model_facts.device)
            self.n_sequences_consumed += tokens.shape[0]
            prefix = run_prefix(self.model, tokens, plan)
            clean = run_clean_multi(self.model, prefix, plan, full=False)
            mask = step_mask(tokens, positions)
            for name in needs:
                batches[name].append(selected_rows(clean.acts[plan.plans[name].hook_name], mask))
        for name in needs:
            self.trainers[name].activation_scaler.estimate_scaling_factor(
                d_in=self.saes[name].cfg.d_in,
                data_provider=iter(batches[name]),
                n_batches_for_norm_estimate=len(batches[name]),
            )

    def _finish(self) -> None:
        # What SAETrainer.fit does after its loop, for each SAE: fold the activation scaling
        # into the weights, record the last window's L0 and dead features.
        for name, trainer in self.trainers.items():
            if trainer.activation_scaler.scaling_factor is not None:
                self.saes[name].fold_activation_norm_scaling_factor(
                    trainer.activation_scaler.scaling_factor
                )
                trainer.activation_scaler.scaling_factor = None
            trainer.set_final_sae_metadata()

    def _checkpoint_if_needed(self) -> None:
        if self.checkpoint_thresholds and self.n_training_samples > self.checkpoint_thresholds[0]:
            self.save_checkpoint(checkpoint_name=str(self.n_training_samples))
            self.checkpoint_thresholds.pop(0)

    def _sae_folders(self, checkpoint: Path) -> dict[str, Path]:
        return {
            name: checkpoint if self.one_sae_layout else checkpoint / name for name in self.saes
        }

    def _state(self) -> dict[str, Any]:
        """What the completion marker says, then the rest of ``e2e_trainer_state.json``."""
        marker: dict[str, Any] = {
            "n_training_samples": self.n_training_samples,
            "n_steps_taken": self.n_steps_taken,
            "objective": self.step_pass.objective.name,
            "next_phase": self.schedule.phase(self.n_steps_taken),
        }
        if not self.one_sae_layout:
            marker |= {"saes": list(self.saes), "splice": self.step_pass.plan.mode}
        return marker

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """Every SAE's SAETrainer files plus the run's position, published only when every file
        is written (by rank 0 alone; the other ranks wait)."""
        if self.cfg.checkpoint_path is None:
            return
        base = Path(self.cfg.checkpoint_path)
        if self.context is None or self.context.is_main:
            marker = self._state()
            with staged_checkpoint(base, checkpoint_name, marker) as staging:
                for name, folder in self._sae_folders(staging).items():
                    SAETrainer.save_checkpoint(self.trainers[name], folder.name, folder.parent)
                state = marker | {
                    "n_sequences_consumed": self.n_sequences_consumed,
                    "first_e2e_step": self.schedule.first_e2e_step,
                    "local_data": None if self.local_data is None else self.local_data.state(),
                }
                (staging / TRAINER_STATE_FILENAME).write_text(json.dumps(state))
                if self.save_checkpoint_fn is not None:
                    self.save_checkpoint_fn(checkpoint_path=staging)
        if self.context is not None:
            barrier(self.context, f"rank 0 writing checkpoint {checkpoint_name}")
        self.last_checkpoint = base / checkpoint_name

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore every SAE's weights and trainer, and the step and stream counters."""
        state = read_run_state(
            checkpoint,
            None if self.one_sae_layout else (list(self.saes), self.step_pass.plan.mode),
            self.step_pass.objective.name,
            self.schedule.first_e2e_step,
        )
        self.saved_local_data = state.get("local_data")
        steps = int(state["n_steps_taken"])
        for name, folder in self._sae_folders(checkpoint).items():
            trainer = self.trainers[name]
            refuse_unsafe_trainer_state(folder, self.cfg.device, trainer.optimizer)
            SAETrainer.load_trainer_state(trainer, folder)
            trainer.choose_adam_kernel()  # the checkpoint's param groups name its writer's kernel
            trainer.sae.load_weights_from_checkpoint(folder)
            # SAETrainer saves its step count before counting the step it checkpoints after.
            trainer.n_training_steps = steps
        self.n_training_steps = self.n_steps_taken = steps
        # Older single-SAE checkpoints keep the token count in SAETrainer's state alone.
        first = next(iter(self.trainers.values()))
        self.n_training_samples = int(state.get("n_training_samples", first.n_training_samples))
        self.n_sequences_consumed = int(state["n_sequences_consumed"])
        truncate_after(self.training_log_path, steps)
        # Checkpoints already written before the interruption are not written again.
        self.checkpoint_thresholds = [
            t for t in self.checkpoint_thresholds if t >= self.n_training_samples
        ]
