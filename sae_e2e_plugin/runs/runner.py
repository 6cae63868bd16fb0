"""``E2ESAETrainingRunner``: model + SAELens ActivationsStore + E2ESAETrainer + export.

It is SAELens' ``LanguageModelSAETrainingRunner`` with the data path swapped:
the trainer reads whole token sequences from ``ActivationsStore.get_batch_tokens``
instead of the shuffled activation buffer, and the final SAE is written in
SAELens' inference format with the objective recorded in its metadata.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import wandb
from sae_lens import SAE, LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.activation_scaler import ActivationScaler

from sae_e2e_plugin.assets.corpora import is_builtin_dataset
from sae_e2e_plugin.core.model_splice import is_spliceable, plan_splice
from sae_e2e_plugin.core.positions import PositionFilter
from sae_e2e_plugin.evaluation.evaluate import evaluate_sae
from sae_e2e_plugin.evaluation.metrics import EvalResult
from sae_e2e_plugin.interop.hub import load_pretrained_sae
from sae_e2e_plugin.run_files import EVAL_FILENAME, TRAINING_LOG_FILENAME
from sae_e2e_plugin.runs.data_checks import check_dataset, check_model_and_data, dataset_label
from sae_e2e_plugin.runs.data_paths import local_dataset
from sae_e2e_plugin.runs.data_streams import BufferedActivations, TokenBatches, reposition
from sae_e2e_plugin.runs.export import load_exported_sae, record_exported_l0, remove_local_paths
from sae_e2e_plugin.runs.output_folder import (
    check_output_folder,
    export_atomically,
    hold_folder,
    remove_previous_run,
)
from sae_e2e_plugin.runs.run_setup import (
    held_out_tokens,
    initial_weights_from_seed,
    model_dtype,
    position_filter,
    resolve_builtins,
    start_wandb,
    warn_if_bf16_is_emulated,
)
from sae_e2e_plugin.training.checkpoints import ResumeError, resolve_resume_checkpoint
from sae_e2e_plugin.training.config import E2ERunnerConfig
from sae_e2e_plugin.training.data_parallel import (
    DataParallelE2ESAETrainer,
    check_data_parallel_config,
)
from sae_e2e_plugin.training.distributed import barrier, from_main, setup_distributed
from sae_e2e_plugin.training.multi_config import E2EMultiRunnerConfig
from sae_e2e_plugin.training.objectives import ResolvedObjective, resolve_objective
from sae_e2e_plugin.training.run_identity import check_resume_identity
from sae_e2e_plugin.training.timing import NO_TIMING, PhaseTimer
from sae_e2e_plugin.training.trainer import E2ESAETrainer, TrainingInterrupted, freeze
from sae_e2e_plugin.version import __version__

logger = logging.getLogger(__name__)


class E2ESAETrainingRunner(LanguageModelSAETrainingRunner):
    """Train an SAE with an end-to-end objective; ``run()`` returns it and writes it to ``output_path``."""

    cfg: E2ERunnerConfig[Any]
    model: Any
    """A ``HookedTransformer``, or SAELens' ``HookedProxyLM`` around a Hugging Face model."""
    trains_several_saes = False
    """Whether the runner trains every SAE of an ``E2EMultiRunnerConfig`` (the multi runner)."""

    def __init__(
        self,
        cfg: E2ERunnerConfig[Any],
        override_model: Any = None,
        override_dataset: HfDataset | None = None,
        override_sae: TrainingSAE[Any] | None = None,
    ) -> None:
        if not isinstance(cfg, E2ERunnerConfig):
            raise ValueError(
                f"cfg is a {type(cfg).__name__}; E2ESAETrainingRunner needs an E2ERunnerConfig "
                "(the same fields plus loss=...)."
            )
        if isinstance(cfg, E2EMultiRunnerConfig) and not self.trains_several_saes:
            raise ValueError(
                "cfg is an E2EMultiRunnerConfig (several SAEs); train it with "
                "E2EMultiSAETrainingRunner, which trains every SAE in saes."
            )
        # SAELens draws the SAE's initial weights from torch's global generator: seeded here,
        # a run starts the same whatever ran before it in the process (a sweep's earlier runs,
        # a notebook's cells).
        torch.manual_seed(cfg.seed)
        self.context = setup_distributed(
            cfg.distributed_backend, cfg.distributed_timeout_s, cfg.device
        )
        """This process' rank in a run started by torchrun (``SINGLE_PROCESS`` otherwise)."""
        check_data_parallel_config(cfg, self.context)
        # SAELens names the checkpoint folder with a random id: rank 0's is the run's.
        cfg.checkpoint_path = from_main(cfg.checkpoint_path, self.context, "checkpoint_path")
        self.resume_checkpoint = (
            None
            if cfg.resume_from_checkpoint is None
            else self._resolve_resume(cfg.resume_from_checkpoint)
        )
        """The complete checkpoint ``resume_from_checkpoint`` names (checked before anything runs)."""
        check_resume_identity(self.resume_checkpoint, cfg)  # the same run, or refused by field
        self._previous_run = check_output_folder(
            cfg.output_path,
            resuming=cfg.resume_from_checkpoint is not None,
            overwrite=cfg.overwrite_output,
        )
        self._builtin_dataset = override_dataset is None and is_builtin_dataset(cfg.dataset_path)
        data_name = dataset_label(cfg, overridden=override_dataset is not None)
        override_dataset = local_dataset(cfg, override_dataset)  # a local path read, checked
        override_model, override_dataset = resolve_builtins(cfg, override_model, override_dataset)
        check_dataset(cfg, override_dataset, data_name)
        if override_sae is None and cfg.pretrained_sae is not None:
            override_sae = load_pretrained_sae(
                cfg.pretrained_sae, cfg.pretrained_sae_id, cfg.sae, cfg.hook_name, cfg.device
            )
        super().__init__(
            cfg,
            override_dataset=override_dataset,
            override_model=override_model,
            override_sae=override_sae,
        )
        if override_sae is None and cfg.from_pretrained_path is None:  # the same on every path
            initial_weights_from_seed(self.sae, cfg)
        if not is_spliceable(self.model):
            raise ValueError(
                f"the model is a {type(self.model).__name__}; end-to-end training needs a "
                "TransformerLens HookedTransformer or a Hugging Face causal LM "
                "(model_class_name='AutoModelForCausalLM')."
            )
        check_model_and_data(
            cfg, self.model, self.activations_store, data_name, builtin=self._builtin_dataset
        )
        dtype = model_dtype(cfg)
        if dtype is not None:
            warn_if_bf16_is_emulated(dtype, str(cfg.llm_device or cfg.device))
            self.model.to(getattr(torch, dtype))
            logger.info(f"the language model is held in {dtype} (lm_dtype={cfg.lm_dtype!r})")
        freeze(self.model)
        self.positions = position_filter(cfg, self.activations_store)
        """The positions the SAE reads and replaces, resolved once (``core.positions``)."""
        self.objective = resolve_objective(cfg)
        """The run's objective, resolved once here and handed to the trainer."""
        self.plan = plan_splice(
            self.model,
            cfg.hook_name,
            cfg.downstream_hooks if self.objective.uses_downstream_hooks else (),
            d_in=self.sae.cfg.d_in,
        )
        if self.objective.uses_downstream_hooks and not self.plan.downstream_hooks:
            raise ValueError(
                f"hook_name={cfg.hook_name!r} has no residual-stream hook after it, so "
                "loss='e2e_downstream' has nothing to compare. Use loss='e2e' or an earlier hook."
            )
        self.trainer: E2ESAETrainer | None = None
        self.eval_history: list[tuple[int, EvalResult]] = []
        """(step, result) of each evaluation during training, and the final one."""
        self.eval_tokens = held_out_tokens(
            cfg, self.model, self.activations_store, training_on_it=not self._builtin_dataset
        )
        """[n_eval_sequences, context_size] held-out tokens (None when n_eval_batches=0)."""
        self.timer: PhaseTimer = NO_TIMING
        """Passed to the trainer: set a ``PhaseTimer`` before ``run()`` to time a step's phases."""

    def _resolve_resume(self, path: str) -> Path:
        # A seam for runners whose checkpoints hold other files (several SAEs).
        return resolve_resume_checkpoint(path)

    def run(self) -> TrainingSAE[Any]:
        """Train, write the final SAE to ``cfg.output_path`` (if set) and return it.

        ``output_path`` (with the checkpoints inside it, by default) is held for the whole run
        (``hold_folder``): another process started on it meanwhile is refused. Started by
        torchrun, every rank trains its share and rank 0 alone writes files (and holds the
        folder; docs/distributed.md).
        """
        if self.cfg.output_path is None or not self.context.is_main:
            return self._run()
        with hold_folder(self.cfg.output_path, "output_path"):
            return self._run()

    def _run(self) -> TrainingSAE[Any]:
        # Every rank has checked the output folder before rank 0 may change it.
        barrier(self.context, "checking the output folder")
        main = self.context.is_main
        if main:
            remove_previous_run(self._previous_run)  # overwrite_output, every check passed
        self._set_sae_metadata()
        self._set_objective_metadata()
        if self.cfg.logger.log_to_wandb and main:
            start_wandb(self.cfg)
        tokens = TokenBatches(self.activations_store, self.cfg.sequences_per_batch)
        # Built for a schedule with local steps only: an all-e2e run draws exactly as before.
        local = (
            BufferedActivations(self.activations_store, self.cfg.seed, self.cfg.sequences_per_batch)
            if self.cfg.e2e_fraction < 1
            else None
        )
        parallel: dict[str, Any] = {"context": self.context} if self.context.is_distributed else {}
        trainer_class = DataParallelE2ESAETrainer if parallel else E2ESAETrainer
        self.trainer = trainer = trainer_class(
            cfg=trainer_config_for_rank(self.cfg, main),
            sae=self.sae,
            data_provider=tokens,
            model=self.model,
            plan=self.plan,
            e2e_cfg=self.cfg,
            objective=self.objective,
            save_checkpoint_fn=self.save_checkpoint,
            periodic_eval=self._evaluate_during_training if main else None,
            training_log_path=(
                None
                if self.cfg.output_path is None or not main
                else Path(self.cfg.output_path) / TRAINING_LOG_FILENAME
            ),
            timer=self.timer,
            positions=self.positions,
            local_data=local,
            **parallel,
        )
        logger.info(f"training schedule: {trainer.schedule.describe(self.cfg.loss)}")
        if self.resume_checkpoint is not None:
            self._resume(trainer, tokens, local, self.resume_checkpoint)
        elif trainer.training_log_path is not None:
            # A fresh run starts a fresh log.
            trainer.training_log_path.unlink(missing_ok=True)
        self._compile_sae_if_needed()
        sae = self.run_trainer_with_interruption_handling(trainer)
        if self.cfg.output_path is not None and main:
            self.save_final_sae(
                sae=sae,
                output_path=self.cfg.output_path,
                log_feature_sparsity=trainer.log_feature_sparsity,
            )
        logger.info(first_to_last(trainer))
        # Evaluation is rank 0's alone: the others wait (within distributed_timeout_s).
        if self.cfg.eval_at_end and self.eval_tokens is not None and main:
            self._final_evaluation(trainer)
        if self.cfg.logger.log_to_wandb and main:
            wandb.finish()
        barrier(self.context, "rank 0 exporting and evaluating the SAE")
        return sae

    def evaluate(
        self, activation_scaler: ActivationScaler | None = None, sae: SAE[Any] | None = None
    ) -> EvalResult:
        """``sae``'s (default: the training SAE's) metrics on the held-out tokens (``evaluate_sae``)."""
        if self.eval_tokens is None:
            raise ValueError("n_eval_batches=0: there are no held-out tokens to evaluate on.")
        return evaluate_sae(
            sae if sae is not None else self.sae,
            self.model,
            self.eval_tokens.split(self.cfg.eval_sequences_per_batch),
            hook_name=self.cfg.hook_name,
            alive_window_tokens=None,
            logits_chunk_size=self.cfg.kl_chunk_size,
            activation_scaler=activation_scaler,
            positions=self.positions,
        )

    def _evaluate_during_training(self, trainer: E2ESAETrainer) -> None:
        if self.eval_tokens is None:
            return
        result = self.evaluate(trainer.activation_scaler)
        self.eval_history.append((trainer.n_steps_taken, result))
        logger.info(
            f"evaluation of the training SAE after step {trainer.n_steps_taken}:\n"
            f"{result.format_table()}"
        )
        if self.cfg.logger.log_to_wandb:
            wandb.log(_wandb_eval_dict(result), step=trainer.n_training_steps)

    def _final_evaluation(self, trainer: E2ESAETrainer) -> None:
        # The SAE as exported (activation scaling folded in; batch top-k as JumpReLU), not the
        # training SAE: eval.json and cfg.json describe the file users load.
        exported = load_exported_sae(self.sae, self.cfg.output_path, self.cfg.device)
        result = self.evaluate(sae=exported)
        self.eval_history.append((trainer.n_steps_taken, result))
        logger.info(f"final evaluation on held-out tokens (exported SAE):\n{result.format_table()}")
        if self.cfg.output_path is not None:
            # eval.json marks a finished run (sweeps), so it is written last.
            record_exported_l0(self.cfg.output_path, result.l0)
            path = result.save_json(Path(self.cfg.output_path) / EVAL_FILENAME)
            logger.info(f"saved the evaluation to {path}")
        if self.cfg.logger.log_to_wandb:
            wandb.log(_wandb_eval_dict(result), step=trainer.n_training_steps)

    def _resume(
        self,
        trainer: E2ESAETrainer,
        tokens: TokenBatches,
        local: BufferedActivations | None,
        checkpoint: Path,
    ) -> None:
        logger.info(f"resuming from checkpoint {checkpoint}")
        try:
            trainer.load_trainer_state(checkpoint)
            self.sae.load_weights_from_checkpoint(checkpoint)
        except ResumeError:
            raise
        except Exception as error:  # a file damaged after it was written
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint {checkpoint} could not be read "
                f"({type(error).__name__}: {str(error)[:200]}); a file in it is damaged. Resume "
                "from an earlier checkpoint of the run."
            ) from error
        reposition(trainer, tokens, local)

    def save_final_sae(
        self,
        sae: TrainingSAE[Any],
        output_path: str,
        log_feature_sparsity: torch.Tensor | None = None,
    ) -> None:
        """SAELens' export, written atomically (``runs.output_folder.export_atomically``), with
        ``runner_cfg.json`` rewritten without local paths (it is what gets uploaded)."""

        def write(folder: str) -> None:
            super(E2ESAETrainingRunner, self).save_final_sae(sae, folder, log_feature_sparsity)
            remove_local_paths(folder)

        export_atomically(output_path, write)

    def run_trainer_with_interruption_handling(self, trainer: E2ESAETrainer) -> TrainingSAE[Any]:  # type: ignore[override]
        """Run ``trainer.fit()``; on SIGINT/SIGTERM finish the current step, checkpoint, stop.

        The signal only sets a flag, so the checkpoint is never taken halfway
        through an optimizer update. A second SIGINT stops at once.
        """

        def request_stop(signum: int, frame: FrameType | None) -> None:
            if trainer.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            trainer.stop_requested = True

        # Signal handlers can only be installed from the main thread.
        in_main = threading.current_thread() is threading.main_thread()
        signals = (signal.SIGINT, signal.SIGTERM) if in_main else ()
        previous = {sig: signal.signal(sig, request_stop) for sig in signals}
        try:
            return trainer.fit()
        except TrainingInterrupted as interruption:
            if self.cfg.checkpoint_path is not None:
                trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))
                interruption.checkpoint = trainer.last_checkpoint
                logger.warning(f"interrupted: checkpoint written to {trainer.last_checkpoint}")
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _set_objective_metadata(self) -> None:
        self.sae.cfg.metadata.e2e_objective = objective_metadata(
            self.cfg, self.objective, self.positions, self.plan.downstream_hooks
        )


def objective_metadata(
    cfg: E2ERunnerConfig[Any],
    objective: ResolvedObjective,
    positions: PositionFilter,
    downstream_hooks: Sequence[str],
) -> dict[str, Any]:
    """What an exported SAE records of how it was trained (``metadata.e2e_objective``)."""
    return {
        "loss": objective.name,
        "kl_coefficient": cfg.kl_coefficient,
        "downstream_coefficient": cfg.downstream_coefficient,
        "downstream_hooks": list(downstream_hooks),
        "local_mse_coefficient": objective.local_mse_weight,
        # The positions the SAE was trained on (SAELens records seqpos_slice too).
        "seqpos_slice": list(positions.seqpos_slice),
        "excluded_token_ids": list(positions.excluded_ids),
        "e2e_fraction": cfg.e2e_fraction,
        "kl_mse_balance": cfg.kl_mse_balance,
        "trained_with": f"sae-e2e-plugin {__version__}",
    }


def trainer_config_for_rank(cfg: E2ERunnerConfig[Any], main: bool) -> SAETrainerConfig:
    """The trainer's config; ranks other than 0 log nothing to wandb (rank 0 logs the run)."""
    trainer_cfg = cfg.to_sae_trainer_config()
    if main or not trainer_cfg.logger.log_to_wandb:
        return trainer_cfg
    quiet = dataclasses.replace(trainer_cfg.logger, log_to_wandb=False)
    return dataclasses.replace(trainer_cfg, logger=quiet)


def first_to_last(trainer: E2ESAETrainer) -> str:
    """One line: each loss term on the first and on the last training batch."""
    terms = [
        f"{name} {trainer.first_losses[name]:.4g} -> {value:.4g}"
        for name, value in trainer.last_losses.items()
        if name in trainer.first_losses and not name.startswith("downstream_mse_loss/")
    ]
    return f"training batches, first step -> last step: {', '.join(terms)}"


def _wandb_eval_dict(result: EvalResult) -> dict[str, Any]:
    return {
        f"eval/{key}": value
        for key, value in result.to_dict().items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
