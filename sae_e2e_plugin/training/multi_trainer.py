"""``E2EMultiSAETrainer``: several SAEs trained in lockstep on one stream of token batches.

Like SAELens' ``MultiSAETrainer`` it holds one ``SAETrainer`` per SAE — an ``E2ESAETrainer``,
which owns that SAE's Adam, LR and coefficient schedules, activation scaler and dead-feature
statistics, and does what a single run does after its step pass (NaN check, statistics, update;
its data-parallel form the same with the rules of ``training.data_parallel``). The step pass
itself (``training.multi_step``) runs the model once for all SAEs; a local step is each SAE's
own. A checkpoint is one complete-or-absent folder
(``training.checkpoints.staged_checkpoint``) holding one SAETrainer checkpoint per SAE
(``<checkpoint>/<name>/``) and the token-stream position.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from tqdm.auto import tqdm

from sae_e2e_plugin.core.model_splice import model_facts, run_clean_multi, run_prefix
from sae_e2e_plugin.core.positions import selected_positions, selected_rows
from sae_e2e_plugin.run_files import TRAINER_STATE_FILENAME
from sae_e2e_plugin.training.checkpoints import (
    ResumeError,
    refuse_unsafe_trainer_state,
    staged_checkpoint,
)
from sae_e2e_plugin.training.config import E2ERunnerConfig
from sae_e2e_plugin.training.data_parallel import (
    DataParallelE2ESAETrainer,
    any_rank_stops,
    weigh_by_rows,
)
from sae_e2e_plugin.training.distributed import (
    DistributedContext,
    barrier,
    broadcast_from_main,
    rank_share,
)
from sae_e2e_plugin.training.multi_step import MultiStepPass
from sae_e2e_plugin.training.schedule import LocalData, Phase, plan_schedule
from sae_e2e_plugin.training.trainer import E2ESAETrainer, freeze, stop_if_requested
from sae_e2e_plugin.training.training_log import (
    append_row,
    batch_l0,
    logged_terms,
    truncate_after,
)


class E2EMultiSAETrainer:
    """Trains ``saes`` (by name) on ``(batch, context_size)`` token batches, one step for all."""

    def __init__(
        self,
        cfg: SAETrainerConfig,
        saes: Mapping[str, TrainingSAE[Any]],
        data_provider: Iterator[torch.Tensor],
        step_pass: MultiStepPass,
        e2e_cfg: E2ERunnerConfig[Any],
        *,
        training_log_path: Path | None = None,
        periodic_eval: Callable[[E2EMultiSAETrainer], None] | None = None,
        local_data: LocalData | None = None,
        context: DistributedContext | None = None,
    ) -> None:
        self.cfg = cfg
        self.e2e_cfg = e2e_cfg
        self.schedule = plan_schedule(
            cfg.total_training_samples, cfg.train_batch_size_samples, e2e_cfg.e2e_fraction
        )
        """Which steps are local and which end to end (``training.schedule``)."""
        self.local_data = local_data
        """``{hook: [rows, d_in]}`` activation batches for the local steps (None: none)."""
        self.saved_local_data: dict[str, Any] | None = None
        """The local data's position read from the checkpoint being resumed."""
        self.last_phase: Phase = self.schedule.phase(0)
        self.saes = dict(saes)
        self.tokens = data_provider
        self.step_pass = step_pass
        """The step's forward and backward passes (model, splice plan, objective)."""
        self.model = freeze(step_pass.model)
        self.device = model_facts(self.model).device
        """Where token ids go."""
        self.context = context
        """This rank's place in the process group (None: one process)."""
        if context is not None and not step_pass.positions.selects_all:
            # With excluded ids the ranks select different numbers of rows.
            step_pass.weigh_sae_terms = partial(weigh_by_rows, context=context)
        self.trainers = {
            name: self._sae_trainer(name, sae, local_data) for name, sae in saes.items()
        }
        """One trainer per SAE (a SAELens ``SAETrainer``: its optimizer, schedules, scaler and
        statistics; ``E2ESAETrainer``'s NaN check, statistics and update, data-parallel rules)."""
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
        """One JSON line per step: step, tokens, seconds and each SAE's terms as ``<name>/<term>``."""
        self.periodic_eval = periodic_eval
        """Called every ``eval_every_n_steps`` completed steps (held-out evaluation)."""
        self.stop_requested = False
        """Set by a signal handler; the next step stops before touching any state."""
        self.last_checkpoint: Path | None = None
        self.last_losses: dict[str, dict[str, float]] = {}
        """Each SAE's loss terms on the latest step."""
        self._last_row_time = time.perf_counter()

    def _sae_trainer(
        self, name: str, sae: TrainingSAE[Any], local_data: LocalData | None
    ) -> E2ESAETrainer:
        # Checkpoints are the coordinator's; each SAE's trainer writes its part into them.
        per_sae = replace(self.cfg, n_checkpoints=0, save_final_checkpoint=False)
        trainer_class: type[E2ESAETrainer] = E2ESAETrainer
        parallel: dict[str, Any] = {}
        if self.context is not None:
            trainer_class, parallel = DataParallelE2ESAETrainer, {"context": self.context}
        return trainer_class(
            cfg=per_sae,
            sae=sae,
            data_provider=iter(()),
            model=self.model,
            plan=self.step_pass.plan.plans[name],
            e2e_cfg=self.e2e_cfg,
            objective=self.step_pass.objective,
            positions=self.step_pass.positions,
            local_data=local_data,
            sae_name=name,
            **parallel,
        )

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
            desc=f"Training {len(self.saes)} SAEs",
        )
        self._last_row_time = time.perf_counter()
        while self.n_training_samples < self.cfg.total_training_samples:
            sparsity = {name: t.maybe_reset_sparsity() for name, t in self.trainers.items()}
            local = self.schedule.phase(self.n_steps_taken) == "local"
            outputs = self.step(next(self.local_data if local else self.tokens))  # type: ignore[arg-type]
            if self.cfg.logger.log_to_wandb:
                self._log_to_wandb(outputs, sparsity)
            self._checkpoint_if_needed()
            for trainer in self.trainers.values():
                trainer.n_training_steps += 1
            self.n_training_steps += 1
            pbar.update(self.cfg.train_batch_size_samples)
        pbar.close()
        self._finish()
        if self.cfg.save_final_checkpoint:
            self.save_checkpoint(checkpoint_name=f"final_{self.n_training_samples}")
        return self.saes

    def step(self, batch: Any) -> dict[str, TrainStepOutput]:
        """One step of every SAE: on a ``(batch, context_size)`` token batch in the e2e phase,
        on ``{hook: [rows, d_in]}`` activations in the local phase."""
        self.last_phase = self.schedule.phase(self.n_steps_taken)
        if self.context is not None:  # all ranks stop before the same step
            self.stop_requested = any_rank_stops(self.stop_requested, self.context, self.cfg.device)
        for trainer in self.trainers.values():
            trainer.last_phase = self.last_phase
        if self.last_phase == "local":
            outputs = self._local_step(batch)
        else:
            outputs = self._e2e_step(batch)
        self.n_steps_taken += 1
        self.last_losses = {name: logged_terms(output) for name, output in outputs.items()}
        if self.training_log_path is not None:
            self._append_log_row(outputs)
        every = self.e2e_cfg.eval_every_n_steps
        if self.periodic_eval is not None and every > 0 and self.n_steps_taken % every == 0:
            self.periodic_eval(self)
        return outputs

    def _local_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, TrainStepOutput]:
        stop_if_requested(self)
        outputs = {}
        for name, trainer in self.trainers.items():
            # SAELens' own local step (a rank's share of the rows in a data-parallel run).
            outputs[name] = trainer._local_step(batch[self.step_pass.plan.plans[name].hook_name])
        self.n_training_samples += self.cfg.train_batch_size_samples
        return outputs

    def _e2e_step(self, tokens: torch.Tensor) -> dict[str, TrainStepOutput]:
        if tokens.ndim != 2 or tokens.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"E2EMultiSAETrainer.step expects integer tokens of shape (batch, context_size), "
                f"got {tuple(tokens.shape)} of {tokens.dtype}."
            )
        stop_if_requested(self)
        tokens = tokens.to(self.device)
        self.n_sequences_consumed += tokens.shape[0]
        self.n_training_samples += tokens.numel()
        for trainer in self.trainers.values():
            trainer.n_training_samples += tokens.numel()
        rows = tokens if self.context is None else rank_share(tokens, self.context)
        outputs = self.step_pass.run(rows, self.trainers)
        for name, trainer in self.trainers.items():
            outputs[name] = trainer.global_losses(trainer.finish_e2e_step(outputs[name]))
        return outputs

    @torch.no_grad()
    def _log_to_wandb(
        self, outputs: Mapping[str, TrainStepOutput], sparsity: Mapping[str, dict[str, Any]]
    ) -> None:
        """SAETrainer's wandb rows of every SAE in one row, each key under ``<name>/``."""
        row: dict[str, Any] = {}
        for name, log in sparsity.items():
            row |= {f"{name}/{key}": value for key, value in log.items()}
        if (self.n_training_steps + 1) % self.cfg.logger.wandb_log_frequency == 0:
            row["details/n_training_samples"] = self.n_training_samples
            for name, trainer in self.trainers.items():
                log = trainer.build_train_step_log_dict(outputs[name], self.n_training_samples)
                row |= {f"{name}/{key}": value for key, value in log.items()}
        if row:
            wandb.log(row, step=self.n_training_steps)

    def _append_log_row(self, outputs: Mapping[str, TrainStepOutput]) -> None:
        assert self.training_log_path is not None
        row: dict[str, Any] = {"step": self.n_steps_taken, "tokens": self.n_training_samples}
        row["phase"] = self.last_phase
        for name, output in outputs.items():
            row |= {f"{name}/{term}": value for term, value in self.last_losses[name].items()}
            row[f"{name}/l0"] = batch_l0(output)
        now = time.perf_counter()
        row["seconds"], self._last_row_time = round(now - self._last_row_time, 4), now
        append_row(self.training_log_path, row)

    @torch.no_grad()
    def _estimate_scaling_factors(self) -> None:
        """Each scaler that needs an estimate gets one from the same token batches (as many as
        a single run draws), read at its SAE's hook."""
        needs = [
            name
            for name, trainer in self.trainers.items()
            if trainer.sae.cfg.normalize_activations == "expected_average_only_in"
            and trainer.activation_scaler.scaling_factor is None
        ]
        if not needs:
            return
        plan = self.step_pass.plan
        batches: dict[str, list[torch.Tensor]] = {name: [] for name in needs}
        for _ in range(self.cfg.n_batches_for_norm_estimate):
            tokens = next(self.tokens).to(self.device)
            self.n_sequences_consumed += tokens.shape[0]
            prefix = run_prefix(self.model, tokens, plan)
            clean = run_clean_multi(self.model, prefix, plan, full=False)
            positions = self.step_pass.positions
            mask = None if positions.selects_all else selected_positions(tokens, positions)
            for name in needs:
                acts = clean.acts[plan.plans[name].hook_name]
                batches[name].append(selected_rows(acts, mask))
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

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """``<checkpoint_path>/<checkpoint_name>/<sae name>/`` (SAETrainer's files) plus the
        stream position, published only when every file is written (by rank 0 alone)."""
        if self.cfg.checkpoint_path is None:
            return
        base = Path(self.cfg.checkpoint_path)
        if self.context is not None and not self.context.is_main:
            barrier(self.context, f"rank 0 writing checkpoint {checkpoint_name}")
            self.last_checkpoint = base / checkpoint_name
            return
        marker = {
            "n_training_samples": self.n_training_samples,
            "n_steps_taken": self.n_steps_taken,
            "saes": list(self.saes),
            "splice": self.step_pass.plan.mode,
        }
        with staged_checkpoint(base, checkpoint_name, marker) as staging:
            for name, trainer in self.trainers.items():
                # SAETrainer's own checkpoint (the per-SAE trainer writes no folder of its own).
                SAETrainer.save_checkpoint(trainer, checkpoint_name=name, base_path=staging)
            state = marker | {
                "n_sequences_consumed": self.n_sequences_consumed,
                "objective": self.step_pass.objective.name,
                "first_e2e_step": self.schedule.first_e2e_step,
                "local_data": None if self.local_data is None else self.local_data.state(),
            }
            (staging / TRAINER_STATE_FILENAME).write_text(json.dumps(state))
        self.last_checkpoint = base / checkpoint_name
        if self.context is not None:
            barrier(self.context, f"rank 0 writing checkpoint {checkpoint_name}")

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore every SAE's weights and trainer, and the step and stream counters."""
        state = read_multi_state(checkpoint, list(self.saes), self.step_pass.plan.mode)
        if state["objective"] != self.step_pass.objective.name:
            raise ResumeError(
                f"resume_from_checkpoint={str(checkpoint)!r} was written with loss="
                f"{state['objective']!r}, but this run has loss="
                f"{self.step_pass.objective.name!r}; resume with the checkpoint's loss."
            )
        # Written before schedules existed for several SAEs: every step was e2e.
        first_e2e = int(state.get("first_e2e_step", 0))
        if first_e2e != self.schedule.first_e2e_step:
            raise ResumeError(
                f"resume_from_checkpoint={str(checkpoint)!r} was written by a run whose first "
                f"e2e step was {first_e2e}; this run's schedule switches at step "
                f"{self.schedule.first_e2e_step}. Resume with the checkpoint's e2e_fraction and "
                "training_tokens."
            )
        self.saved_local_data = state.get("local_data")
        steps = int(state["n_steps_taken"])
        for name, trainer in self.trainers.items():
            folder = checkpoint / name
            refuse_unsafe_trainer_state(folder, self.cfg.device)
            SAETrainer.load_trainer_state(trainer, folder)
            trainer.sae.load_weights_from_checkpoint(folder)
            # SAETrainer saves its step count before counting the step it checkpoints after.
            trainer.n_training_steps = steps
        self.n_training_steps = self.n_steps_taken = steps
        self.n_training_samples = int(state["n_training_samples"])
        self.n_sequences_consumed = int(state["n_sequences_consumed"])
        truncate_after(self.training_log_path, steps)
        self.checkpoint_thresholds = [
            t for t in self.checkpoint_thresholds if t >= self.n_training_samples
        ]


def read_multi_state(checkpoint: Path, names: list[str], mode: str) -> dict[str, Any]:
    """The checkpoint's ``e2e_trainer_state.json``, refused unless it is of this run's SAEs."""
    path = checkpoint / TRAINER_STATE_FILENAME
    field = f"resume_from_checkpoint={str(checkpoint)!r}"
    if not path.is_file():
        raise ResumeError(f"{field} has no {TRAINER_STATE_FILENAME}; pass a checkpoint folder.")
    state = json.loads(path.read_text())
    if "saes" not in state:
        raise ResumeError(
            f"{field} is a single-SAE checkpoint; resume it with E2ESAETrainingRunner, or start "
            "this multi-SAE run without resume_from_checkpoint."
        )
    if sorted(state["saes"]) != sorted(names) or state["splice"] != mode:
        raise ResumeError(
            f"{field} holds SAEs {state['saes']} spliced {state['splice']!r}; this run has "
            f"{names} spliced {mode!r}. Resume with the checkpoint's saes and splice."
        )
    missing = [name for name in names if not (checkpoint / name).is_dir()]
    if missing:
        raise ResumeError(f"{field} lacks the folders of SAEs {missing}; it is damaged.")
    return state
