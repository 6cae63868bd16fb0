"""``E2ESAETrainer``: one SAE's part of a training step, as a SAELens ``SAETrainer``.

A run's trainer (``training.loop.trainer``) holds one of these per SAE, as SAELens'
``MultiSAETrainer`` holds one ``SAETrainer`` per SAE. Each owns its SAE's Adam, LR and
coefficient schedules, activation scaler and dead-feature statistics (SAETrainer's own), and
does what comes after the step pass has left its SAE's gradient: the NaN check, the firing
statistics, clipping, the optimizer and schedule steps. A local step (before a schedule's
switch, ``e2e_fraction < 1``) is SAETrainer's own step on activations.

``DataParallelE2ESAETrainer`` is the same for one rank of a process group, applying the rules
of ``training.parallel.data_parallel``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_e2e_plugin.training.loop.adam_kernel import choose_adam_kernel
from sae_e2e_plugin.training.loop.schedule import Phase
from sae_e2e_plugin.training.parallel.data_parallel import (
    average_gradient,
    global_loss_means,
    make_batch_level_state_global,
    update_global_feature_statistics,
)
from sae_e2e_plugin.training.parallel.distributed import DistributedContext, all_reduce, rank_share
from sae_e2e_plugin.training.timing import NO_TIMING, PhaseTimer


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step when the loss is NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Raised at the start of a step after SIGINT/SIGTERM asked training to stop.

    The runner re-raises it with ``checkpoint`` set to the checkpoint it wrote (None when
    checkpointing is off).
    """

    checkpoint: Path | None = None


class E2ESAETrainer(SAETrainer[Any, Any]):
    """One SAE's optimizer, schedules, scaler and statistics in a run (see the module docstring)."""

    def __init__(
        self,
        cfg: SAETrainerConfig,
        sae: TrainingSAE[Any],
        *,
        max_grad_norm: float | None = None,
        name: str | None = None,
        timer: PhaseTimer = NO_TIMING,
        fused_adam: bool = False,
    ) -> None:
        # The run's trainer draws the data and writes the checkpoints (one folder for all SAEs).
        per_sae = replace(cfg, n_checkpoints=0, save_final_checkpoint=False)
        super().__init__(cfg=per_sae, sae=sae, data_provider=iter(()))
        self.fused_adam = fused_adam
        """The config's ``fused_adam`` (``training.loop.adam_kernel``)."""
        self.choose_adam_kernel()
        self.max_grad_norm = max_grad_norm
        self.sae_name = name
        """The SAE's name in a run of several; None alone (error messages name it)."""
        self.timer = timer
        """Times the optimizer step (``training.timing``); a no-op unless a benchmark sets one."""
        self.last_phase: Phase = "e2e"
        """The phase of the latest step (set by the run's trainer; errors and wandb name it)."""

    def choose_adam_kernel(self) -> bool:
        """Set the optimizer's kernel from ``fused_adam``: after SAETrainer builds it and after
        a checkpoint's optimizer state replaces its settings. True: torch's fused kernel."""
        return choose_adam_kernel(self.optimizer, self.fused_adam)

    def local_step(self, batch: torch.Tensor, n_tokens: int) -> TrainStepOutput:
        """SAETrainer's own step on ``[rows, d_in]`` activations; the step counts ``n_tokens``
        (the whole sequences' tokens an e2e step would count; the batch holds only the selected
        positions' rows, or a rank's share of them)."""
        if batch.ndim != 2 or not batch.is_floating_point():
            raise ValueError(
                f"step {self.n_training_steps} is a local step and expects activations of shape "
                f"(tokens, d_in), got {tuple(batch.shape)} of {batch.dtype}."
            )
        consumed = self.n_training_samples + n_tokens
        # Scaler, training forward, statistics, backward, clip, Adam: SAELens' local step.
        output = SAETrainer.step(self, batch)
        self.n_training_samples = consumed
        self._check_finite(output, before_update=False)
        return output

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
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.lr_scheduler.step()
        for scheduler in self.coefficient_schedulers.values():
            scheduler.step()

    @torch.no_grad()
    def build_train_step_log_dict(
        self, output: TrainStepOutput, n_training_samples: int
    ) -> dict[str, Any]:
        """SAETrainer's wandb row plus the phase of the step (1: end to end, 0: local)."""
        row = super().build_train_step_log_dict(output, n_training_samples)
        return row | {"details/e2e_phase": int(self.last_phase == "e2e")}


class DataParallelE2ESAETrainer(E2ESAETrainer):
    """``E2ESAETrainer`` for one rank of a process group (``training.parallel.data_parallel``)."""

    def __init__(self, *args: Any, context: DistributedContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context = context
        """This rank's place in the process group."""
        for parameter in self.sae.parameters():
            parameter.register_post_accumulate_grad_hook(partial(average_gradient, context=context))
        make_batch_level_state_global(self.sae, context)

    def local_step(self, batch: torch.Tensor, n_tokens: int) -> TrainStepOutput:
        """SAETrainer's local step on this rank's rows of the global activation batch.

        Every rank fills the same activation buffer (same seed, same data), so each holds the
        global batch; SAETrainer's step then counts this rank's rows and firings, which are
        made global here."""
        freq_before = self.act_freq_scores.clone()
        output = super().local_step(rank_share(batch, self.context), n_tokens)
        fired_here = self.act_freq_scores - freq_before
        what = "summing the firing statistics"
        self.act_freq_scores = freq_before + all_reduce(fired_here, self.context, SUM, what)
        # Steps since a feature fired anywhere: the smallest count over the ranks.
        all_reduce(self.n_forward_passes_since_fired, self.context, dist.ReduceOp.MIN, what)
        return self.global_losses(output)

    def global_losses(self, output: TrainStepOutput) -> TrainStepOutput:
        return global_loss_means({"": output}, self.context)[""]

    def _update_feature_statistics(self, feature_acts: torch.Tensor) -> None:
        update_global_feature_statistics(self, feature_acts, self.context)


SUM = dist.ReduceOp.SUM


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
