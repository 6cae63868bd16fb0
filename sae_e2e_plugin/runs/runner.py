"""``E2ESAETrainingRunner``: model + SAELens ActivationsStore + the run's trainer + export.

It is SAELens' ``LanguageModelSAETrainingRunner`` with the data path swapped: the trainer reads
whole token sequences from ``ActivationsStore.get_batch_tokens`` instead of the shuffled
activation buffer, and each SAE is written in SAELens' inference format with the objective
recorded in its metadata. A run trains a mapping of SAEs: a single-SAE config is the one-entry
case (its SAE is named ``ONE_SAE`` and exported to ``output_path`` itself); an
``E2EMultiRunnerConfig`` trains every SAE of ``saes`` (``runs.multi_runner``), each exported to
``<output_path>/<name>/``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.config import HfDataset, SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE

from sae_e2e_plugin.assets.corpora import is_builtin_dataset
from sae_e2e_plugin.core.model_splice import (
    is_spliceable,
    naming_the_sae,
    plan_multi_splice,
    plan_splice,
)
from sae_e2e_plugin.core.multi_splice import MultiSplicePlan
from sae_e2e_plugin.interop.hub import load_pretrained_sae
from sae_e2e_plugin.run_files import TRAINING_LOG_FILENAME
from sae_e2e_plugin.runs.data_checks import check_dataset, check_model_and_data, dataset_label
from sae_e2e_plugin.runs.data_paths import local_dataset
from sae_e2e_plugin.runs.data_streams import BufferedActivations, TokenBatches, reposition
from sae_e2e_plugin.runs.output_folder import check_output_folder, hold_folder, remove_previous_run
from sae_e2e_plugin.runs.run_outputs import ONE_SAE, RunOutputs
from sae_e2e_plugin.runs.run_setup import (
    check_precisions,
    held_out_tokens,
    initial_weights_from_seed,
    model_dtype,
    position_filter,
    resolve_builtins,
    start_wandb,
)
from sae_e2e_plugin.runs.sae_starts import fresh_sae, pretrained_starts
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig
from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig
from sae_e2e_plugin.training.loop.checkpoints import ResumeError, resolve_resume_checkpoint
from sae_e2e_plugin.training.loop.run_identity import check_resume_identity
from sae_e2e_plugin.training.loop.sae_trainer import TrainingInterrupted, freeze
from sae_e2e_plugin.training.loop.step_pass import StepPass
from sae_e2e_plugin.training.loop.trainer import E2ETrainer
from sae_e2e_plugin.training.objectives import resolve_objective
from sae_e2e_plugin.training.parallel.distributed import (
    barrier,
    check_shardable,
    from_main,
    setup_distributed,
)
from sae_e2e_plugin.training.timing import NO_TIMING, PhaseTimer

logger = logging.getLogger(__name__)


class E2ESAETrainingRunner(RunOutputs, LanguageModelSAETrainingRunner):
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
        *,
        override_saes: dict[str, TrainingSAE[Any]] | None = None,
    ) -> None:
        several = isinstance(cfg, E2EMultiRunnerConfig)
        if not isinstance(cfg, E2ERunnerConfig):
            raise ValueError(
                f"cfg is a {type(cfg).__name__}; {type(self).__name__} needs an E2ERunnerConfig "
                "(the same fields plus loss=...)."
            )
        if several != self.trains_several_saes:
            raise ValueError(
                "cfg is an E2EMultiRunnerConfig (several SAEs); train it with "
                "E2EMultiSAETrainingRunner, which trains every SAE in saes."
                if several
                else "cfg is an E2ERunnerConfig (one SAE); train it with E2ESAETrainingRunner "
                "or give an E2EMultiRunnerConfig (saes={name: config}, hook_names=..., splice=...)."
            )
        # SAELens draws the SAE's initial weights from torch's global generator: seeded here,
        # a run starts the same whatever ran before it in the process (a sweep's earlier runs,
        # a notebook's cells).
        torch.manual_seed(cfg.seed)
        self.cfg = cfg  # SAELens' set-up sets it again; the checks below read it first
        self.context = setup_distributed(
            cfg.distributed_backend, cfg.distributed_timeout_s, cfg.device
        )
        """This process' rank in a run started by torchrun (``SINGLE_PROCESS`` otherwise)."""
        if self.context.is_distributed:  # refused before anything runs
            check_shardable(cfg.sequences_per_batch, self.context)
        # SAELens names the checkpoint folder with a random id: rank 0's is the run's.
        cfg.checkpoint_path = from_main(cfg.checkpoint_path, self.context, "checkpoint_path")
        self.hooks: dict[str, str] = (
            dict(cfg.hook_names_per_sae) if several else {ONE_SAE: cfg.hook_name}  # type: ignore[attr-defined]
        )
        """Each SAE's hook, by name, in the order of ``cfg.saes`` (one SAE: ``ONE_SAE``)."""
        self.hooks_out: dict[str, str] = (
            dict(cfg.hook_names_out)  # type: ignore[attr-defined]
            if several
            else ({} if cfg.hook_name_out is None else {ONE_SAE: cfg.hook_name_out})
        )
        """Each transcoder's output hook (``hook_name_out``), by name; SAEs have none."""
        self.resume_checkpoint = (
            None
            if cfg.resume_from_checkpoint is None
            else resolve_resume_checkpoint(cfg.resume_from_checkpoint, several=several)
        )
        """The complete checkpoint ``resume_from_checkpoint`` names (checked before anything runs)."""
        check_resume_identity(self.resume_checkpoint, cfg)  # the same run, or refused by field
        # Each SAE's folder is a run's output folder: never mixed with an earlier run's files.
        self._previous_run = [
            path
            for folder in self.export_folders().values()
            for path in check_output_folder(
                folder,
                resuming=cfg.resume_from_checkpoint is not None,
                overwrite=cfg.overwrite_output,
            )
        ]
        starts = self._starts(cfg, override_sae, override_saes)
        first = next(iter(self.hooks))
        try:
            self._set_up(cfg, override_model, override_dataset, starts.get(first))
        except ValueError as error:
            if not several or ("hook_name=" not in str(error) and "sae.d_in" not in str(error)):
                raise
            raise naming_the_sae(error, first) from None
        self.saes: dict[str, TrainingSAE[Any]] = {first: self.sae}
        """The SAEs by name, in the order of ``cfg.saes`` (one SAE: ``{ONE_SAE: sae}``)."""
        for name, sae_cfg in list(getattr(cfg, "saes", {}).items())[1:]:
            self.saes[name] = starts.get(name) or fresh_sae(sae_cfg)
            self.saes[name].to(cfg.device)
        self.plan = self._plan()
        """Where each SAE sits and what each mode compares (resolved once)."""
        self.trainer: E2ETrainer | None = None
        self.eval_history = []
        self.eval_results = {}
        self.timer: PhaseTimer = NO_TIMING
        """Passed to the step pass: set a ``PhaseTimer`` before ``run()`` to time a step's phases."""

    def _starts(
        self,
        cfg: E2ERunnerConfig[Any],
        override_sae: TrainingSAE[Any] | None,
        override_saes: dict[str, TrainingSAE[Any]] | None,
    ) -> dict[str, TrainingSAE[Any]]:
        """The SAEs that do not start from SAELens' initialisation, by name."""
        if not self.trains_several_saes:
            if override_sae is None and cfg.pretrained_sae is not None:
                override_sae = load_pretrained_sae(
                    cfg.pretrained_sae,
                    cfg.pretrained_sae_id,
                    cfg.sae,
                    cfg.hook_name,
                    cfg.device,
                    cfg.hook_name_out,
                )
            return {} if override_sae is None else {ONE_SAE: override_sae}
        starts = dict(override_saes or {})
        unknown = sorted(set(starts) - set(self.hooks))
        if unknown:
            raise ValueError(
                f"override_saes names SAEs {unknown} that are not in saes {list(self.hooks)}; "
                "use the names of saes."
            )
        twice = sorted(set(starts) & set(cfg.pretrained_saes))  # type: ignore[attr-defined]
        if twice:
            raise ValueError(
                f"SAEs {twice} are both in override_saes and in pretrained_saes; give each "
                "SAE's start once."
            )
        return starts | pretrained_starts(cfg)  # type: ignore[arg-type]

    def _set_up(
        self,
        cfg: E2ERunnerConfig[Any],
        override_model: Any,
        override_dataset: HfDataset | None,
        override_sae: TrainingSAE[Any] | None,
    ) -> None:
        """SAELens' set-up (model, store, the first SAE) with the data, model and positions
        checked, the model frozen in its dtype and the held-out tokens reserved."""
        builtin_dataset = override_dataset is None and is_builtin_dataset(cfg.dataset_path)
        data_name = dataset_label(cfg, overridden=override_dataset is not None)
        override_dataset = local_dataset(cfg, override_dataset)  # a local path read, checked
        override_model, override_dataset = resolve_builtins(cfg, override_model, override_dataset)
        check_dataset(cfg, override_dataset, data_name)
        LanguageModelSAETrainingRunner.__init__(
            self,
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
            cfg, self.model, self.activations_store, data_name, builtin=builtin_dataset
        )
        dtype = model_dtype(cfg)
        check_precisions(cfg, dtype)
        if dtype is not None:
            self.model.to(getattr(torch, dtype))
            logger.info(f"the language model is held in {dtype} (lm_dtype={cfg.lm_dtype!r})")
        freeze(self.model)
        self.positions = position_filter(cfg, self.activations_store)
        """The positions the SAEs read and replace, resolved once (``core.positions``)."""
        self.objective = resolve_objective(cfg)
        """The run's objective, resolved once here and handed to the step pass."""
        self.eval_tokens = held_out_tokens(
            cfg, self.model, self.activations_store, training_on_it=not builtin_dataset
        )
        """[n_eval_sequences, context_size] held-out tokens (None when n_eval_batches=0)."""

    def _plan(self) -> MultiSplicePlan:
        cfg = self.cfg
        downstream = cfg.downstream_hooks if self.objective.uses_downstream_hooks else ()
        outputs = {n: (hook, self.saes[n].cfg.d_out) for n, hook in self.hooks_out.items()}
        if self.trains_several_saes:
            d_ins = {name: sae.cfg.d_in for name, sae in self.saes.items()}
            plan = plan_multi_splice(
                self.model,
                self.hooks,
                d_ins,
                cfg.splice,  # type: ignore[attr-defined]
                downstream,
                outputs,
            )
        else:
            hook_out, d_out = outputs.get(ONE_SAE, (None, None))
            one = plan_splice(
                self.model,
                cfg.hook_name,
                downstream,
                d_in=self.sae.cfg.d_in,
                hook_name_out=hook_out,
                d_out=d_out,
            )
            plan = MultiSplicePlan.of_one(ONE_SAE, one)
        if not self.objective.uses_downstream_hooks:
            return plan
        if plan.mode == "joint":  # compared after the latest SAE
            empty = [] if plan.downstream_hooks else [plan.names[-1]]
        else:
            empty = [name for name, one in plan.plans.items() if not one.downstream_hooks]
        if empty:
            hook = plan.plans[empty[0]].hook_name
            where = f"SAE {empty[0]!r} at hook {hook!r}" if self.trains_several_saes else ""
            raise ValueError(
                f"{where or f'hook_name={hook!r}'} has no residual-stream hook after it, so "
                "loss='e2e_downstream' has nothing to compare. Use loss='e2e' or an earlier hook."
            )
        return plan

    def run(self) -> Any:
        """Train, write the final SAE to ``cfg.output_path`` (if set) and return it.

        ``output_path`` (with the checkpoints inside it, by default) is held for the whole run
        (``hold_folder``): another process started on it meanwhile is refused. Started by
        torchrun, every rank trains its share and rank 0 alone writes files (and holds the
        folder; docs/distributed.md).
        """
        if self.cfg.output_path is None or not self.context.is_main:
            saes = self._run()
        else:
            with hold_folder(self.cfg.output_path, "output_path"):
                saes = self._run()
        return saes if self.trains_several_saes else saes[ONE_SAE]

    def _run(self) -> dict[str, TrainingSAE[Any]]:
        cfg = self.cfg
        # Every rank has checked the output folders before rank 0 may change them.
        barrier(self.context, "checking the output folder")
        main = self.context.is_main
        if main:
            remove_previous_run(self._previous_run)  # overwrite_output, every check passed
        self.set_metadata()
        if cfg.logger.log_to_wandb and main:
            start_wandb(cfg)
        self.trainer = trainer = self.build_trainer()
        logger.info(f"training schedule: {trainer.schedule.describe(cfg.loss)}")
        tokens, local = trainer.tokens, trainer.local_data
        if self.resume_checkpoint is not None:
            self._resume(trainer, self.resume_checkpoint)
            reposition(trainer, tokens, local)  # type: ignore[arg-type]
        elif trainer.training_log_path is not None:
            trainer.training_log_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        for name in self.saes:  # SAELens' own compile of the training forward pass
            with self.as_the_runners_sae(name):
                self._compile_sae_if_needed()
        self.run_trainer_with_interruption_handling(trainer)
        if main:
            self.export_and_evaluate(trainer)
        barrier(self.context, "rank 0 exporting and evaluating the SAEs")
        return self.saes

    def build_trainer(self) -> E2ETrainer:
        """The run's trainer, as ``run()`` trains with it (benchmarks time its ``step``)."""
        cfg, main = self.cfg, self.context.is_main
        several = self.trains_several_saes
        tokens = TokenBatches(self.activations_store, cfg.sequences_per_batch)
        # Built for a schedule with local steps only: an all-e2e run draws exactly as before.
        # Several SAEs: every hook's activations from one buffer, the rows of the same tokens.
        # A transcoder's rows come with its target's (the MLP output), from the same tokens.
        d_ins = None
        if several or self.hooks_out:
            d_ins = {self.hooks[n]: sae.cfg.d_in for n, sae in self.saes.items()}
            d_ins |= {hook: self.saes[n].cfg.d_out for n, hook in self.hooks_out.items()}
        local = (
            BufferedActivations(self.activations_store, cfg.seed, cfg.sequences_per_batch, d_ins)
            if cfg.e2e_fraction < 1
            else None
        )
        step_pass = StepPass(
            self.model,
            self.plan,
            self.objective,
            cfg.kl_mse_balance,
            self.positions,
            self.timer,
            share_clean_log_probs=getattr(cfg, "share_clean_log_probs", True),
            sparse_topk=cfg.sparse_topk,
        )
        log = None if cfg.output_path is None or not main else Path(cfg.output_path)
        return E2ETrainer(
            trainer_config_for_rank(cfg, main),
            self.saes,
            tokens,
            step_pass,
            cfg,
            one_sae_layout=not several,
            training_log_path=None if log is None else log / TRAINING_LOG_FILENAME,
            # Evaluation is rank 0's alone: the others wait (within distributed_timeout_s).
            periodic_eval=self.evaluate_during_training if main else None,
            local_data=local,
            context=self.context if self.context.is_distributed else None,
            save_checkpoint_fn=self.save_checkpoint,
        )

    def _resume(self, trainer: E2ETrainer, checkpoint: Path) -> None:
        logger.info(f"resuming from checkpoint {checkpoint}")
        try:
            trainer.load_checkpoint(checkpoint)
        except ResumeError:
            raise
        except Exception as error:  # a file damaged after it was written
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint {checkpoint} could not be read "
                f"({type(error).__name__}: {str(error)[:200]}); a file in it is damaged. Resume "
                "from an earlier checkpoint of the run."
            ) from error

    def run_trainer_with_interruption_handling(
        self, trainer: E2ETrainer
    ) -> dict[str, TrainingSAE[Any]]:  # type: ignore[override]
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


def trainer_config_for_rank(cfg: E2ERunnerConfig[Any], main: bool) -> SAETrainerConfig:
    """The trainer's config; ranks other than 0 log nothing to wandb (rank 0 logs the run)."""
    trainer_cfg = cfg.to_sae_trainer_config()
    if main or not trainer_cfg.logger.log_to_wandb:
        return trainer_cfg
    quiet = dataclasses.replace(trainer_cfg.logger, log_to_wandb=False)
    return dataclasses.replace(trainer_cfg, logger=quiet)
