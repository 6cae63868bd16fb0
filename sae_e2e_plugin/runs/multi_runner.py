"""``E2EMultiSAETrainingRunner``: several SAEs in one e2e run, one export folder per SAE.

The single runner's set-up is reused as it is (output folder, built-in model and corpus, data
checks, the model's dtype, the positions, the objective, the held-out tokens): its SAE is the
first of ``saes``. Then the other SAEs are built, every hook is checked against the model
(``core.model_splice.plan_multi_splice``) and ``E2EMultiSAETrainer`` trains them all. Each SAE
is written to ``<output_path>/<name>/`` in SAELens' format, evaluated alone there
(``eval.json``) and, for a joint run, all of them together (``<output_path>/joint_eval.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import wandb
from sae_lens.constants import RUNNER_CFG_FILENAME, SPARSITY_FILENAME
from sae_lens.saes.sae import TrainingSAE
from safetensors.torch import save_file
from transformer_lens import HookedTransformer

from sae_e2e_plugin.core.model_splice import naming_the_sae, plan_multi_splice
from sae_e2e_plugin.core.multi_splice import MultiSplicePlan
from sae_e2e_plugin.evaluation.evaluate import evaluate_sae
from sae_e2e_plugin.evaluation.joint import JointEvalResult
from sae_e2e_plugin.evaluation.metrics import EvalResult
from sae_e2e_plugin.run_files import EVAL_FILENAME, TRAINING_LOG_FILENAME, atomic_write_text
from sae_e2e_plugin.runs.data_streams import BufferedActivations, TokenBatches, reposition
from sae_e2e_plugin.runs.export import load_exported_sae, record_exported_l0, remove_local_paths
from sae_e2e_plugin.runs.output_folder import (
    check_output_folder,
    export_atomically,
    hold_folder,
    remove_previous_run,
)
from sae_e2e_plugin.runs.run_setup import start_wandb
from sae_e2e_plugin.runs.runner import (
    E2ESAETrainingRunner,
    objective_metadata,
    trainer_config_for_rank,
)
from sae_e2e_plugin.runs.sae_starts import fresh_sae, pretrained_starts
from sae_e2e_plugin.training.checkpoints import (
    ResumeError,
    is_complete_checkpoint,
    latest_complete_checkpoint,
)
from sae_e2e_plugin.training.distributed import barrier
from sae_e2e_plugin.training.multi_config import E2EMultiRunnerConfig
from sae_e2e_plugin.training.multi_step import MultiStepPass
from sae_e2e_plugin.training.multi_trainer import E2EMultiSAETrainer

logger = logging.getLogger(__name__)

JOINT_EVAL_FILENAME = "joint_eval.json"
"""In ``output_path`` of a joint run: every SAE spliced together on the held-out tokens."""


class E2EMultiSAETrainingRunner(E2ESAETrainingRunner):
    """Train several SAEs end to end in one run; ``run()`` returns them by name."""

    cfg: E2EMultiRunnerConfig[Any]
    trains_several_saes = True

    def __init__(
        self,
        cfg: E2EMultiRunnerConfig[Any],
        override_model: Any = None,
        override_dataset: Any = None,
        override_saes: dict[str, TrainingSAE[Any]] | None = None,
    ) -> None:
        if not isinstance(cfg, E2EMultiRunnerConfig):
            raise ValueError(
                f"cfg is a {type(cfg).__name__}; E2EMultiSAETrainingRunner needs an "
                "E2EMultiRunnerConfig (saes={name: config}, hook_names=..., splice=...)."
            )
        overrides = dict(override_saes or {})
        unknown = sorted(set(overrides) - set(cfg.saes))
        if unknown:
            raise ValueError(
                f"override_saes names SAEs {unknown} that are not in saes {list(cfg.saes)}; "
                "use the names of saes."
            )
        twice = sorted(set(overrides) & set(cfg.pretrained_saes))
        if twice:
            raise ValueError(
                f"SAEs {twice} are both in override_saes and in pretrained_saes; give each "
                "SAE's start once."
            )
        overrides |= pretrained_starts(cfg)
        # Each SAE's folder is a run's output folder: never mixed with an earlier run's files.
        previous = [
            path
            for name in cfg.saes
            for path in check_output_folder(
                None if cfg.output_path is None else str(Path(cfg.output_path) / name),
                resuming=cfg.resume_from_checkpoint is not None,
                overwrite=cfg.overwrite_output,
            )
        ]
        first = next(iter(cfg.saes))
        try:
            # The single runner's set-up checks the first SAE as it would check a lone one.
            super().__init__(cfg, override_model, override_dataset, overrides.get(first))
        except ValueError as error:
            if "hook_name=" not in str(error) and "sae.d_in" not in str(error):
                raise
            raise naming_the_sae(error, first) from None
        self._previous_run += previous
        self.saes: dict[str, TrainingSAE[Any]] = {first: self.sae}
        """The SAEs by name, in the order of ``cfg.saes``."""
        for name, sae_cfg in list(cfg.saes.items())[1:]:
            self.saes[name] = overrides.get(name) or fresh_sae(sae_cfg)
            self.saes[name].to(cfg.device)
        self.multi_plan: MultiSplicePlan = plan_multi_splice(
            self.model,
            cfg.hook_names_per_sae,
            {name: sae.cfg.d_in for name, sae in self.saes.items()},
            cfg.splice,
            cfg.downstream_hooks if self.objective.uses_downstream_hooks else (),
        )
        """Where each SAE sits and what each mode compares (resolved once)."""
        self._check_downstream()
        if (
            cfg.checkpoint_blocks
            and cfg.splice == "joint"
            and not isinstance(self.model, HookedTransformer)
        ):
            logger.warning(
                "checkpoint_blocks=True: a joint run on a Hugging Face model does not recompute "
                "its layers in the backward pass (same SAEs, the memory of a plain run)."
            )
        self.multi_trainer: E2EMultiSAETrainer | None = None
        self.eval_results: dict[str, EvalResult] = {}
        """Each exported SAE's final evaluation alone, by name."""
        self.multi_eval_history: list[tuple[int, str, EvalResult | JointEvalResult]] = []
        """(step, SAE name or "joint", result) of each evaluation during training."""
        self.joint_eval: JointEvalResult | None = None
        """A joint run's final evaluation of every SAE spliced in together."""

    def _resolve_resume(self, path: str) -> Path:
        folder = Path(path)
        if is_complete_checkpoint(folder):
            return folder
        latest = latest_complete_checkpoint(folder) if folder.is_dir() else None
        if latest is None:
            raise ResumeError(
                f"resume_from_checkpoint={path!r} is neither a complete checkpoint nor a folder "
                "holding one; pass a folder under the run's checkpoint_path."
            )
        logger.info(f"resuming from the latest complete checkpoint in {path}: {latest}")
        return latest

    def _compile_saes_if_needed(self) -> None:
        # SAELens' own compile of the training forward pass, applied to each SAE in turn.
        first = self.sae
        for sae in self.saes.values():
            self.sae = sae
            self._compile_sae_if_needed()
        self.sae = first

    def _check_downstream(self) -> None:
        if not self.objective.uses_downstream_hooks:
            return
        plans = self.multi_plan.plans
        if self.multi_plan.mode == "joint":  # compared after the latest SAE
            empty = [] if self.multi_plan.downstream_hooks else [self.multi_plan.names[-1]]
        else:
            empty = [name for name, plan in plans.items() if not plan.downstream_hooks]
        if empty:
            raise ValueError(
                f"SAE {empty[0]!r} at hook {plans[empty[0]].hook_name!r} has no residual-stream "
                "hook after it, so loss='e2e_downstream' has nothing to compare. Use loss='e2e' "
                "or an earlier hook."
            )

    def run(self) -> dict[str, TrainingSAE[Any]]:  # type: ignore[override]
        """Train, write each SAE to ``<output_path>/<name>`` (if set) and return them by name.

        ``output_path`` is held for the whole run, as a single SAE's run holds it. Started by
        torchrun, every rank trains its share of each batch and rank 0 alone writes files (and
        holds the folder), as in a single SAE's data-parallel run."""
        if self.cfg.output_path is None or not self.context.is_main:
            return self._train_all()
        with hold_folder(self.cfg.output_path, "output_path"):
            return self._train_all()

    def _train_all(self) -> dict[str, TrainingSAE[Any]]:
        cfg = self.cfg
        # Every rank has checked the output folders before rank 0 may change them.
        barrier(self.context, "checking the output folder")
        main = self.context.is_main
        if main:
            remove_previous_run(self._previous_run)
        self._set_metadata()
        self._compile_saes_if_needed()
        if cfg.logger.log_to_wandb and main:
            start_wandb(cfg)
        tokens = TokenBatches(self.activations_store, cfg.sequences_per_batch)
        step_pass = MultiStepPass(
            self.model,
            self.multi_plan,
            self.objective,
            cfg.kl_mse_balance,
            self.positions,
            self.timer,
            share_clean_log_probs=cfg.share_clean_log_probs,
        )
        log = (
            None
            if cfg.output_path is None or not main
            else Path(cfg.output_path) / TRAINING_LOG_FILENAME
        )
        # Every hook's activations from one buffer; built only for a schedule with local steps.
        local = None
        if cfg.e2e_fraction < 1:
            d_ins = {
                self.multi_plan.plans[n].hook_name: sae.cfg.d_in for n, sae in self.saes.items()
            }
            local = BufferedActivations(
                self.activations_store, cfg.seed, cfg.sequences_per_batch, d_ins
            )
        self.multi_trainer = trainer = E2EMultiSAETrainer(
            trainer_config_for_rank(cfg, main),
            self.saes,
            tokens,
            step_pass,
            cfg,
            training_log_path=log,
            # Evaluation is rank 0's alone: the others wait (within distributed_timeout_s).
            periodic_eval=self._evaluate_during_training if main else None,
            local_data=local,
            context=self.context if self.context.is_distributed else None,
        )
        logger.info(f"training schedule: {trainer.schedule.describe(cfg.loss)}")
        if self.resume_checkpoint is not None:
            logger.info(f"resuming from checkpoint {self.resume_checkpoint}")
            trainer.load_checkpoint(self.resume_checkpoint)
            reposition(trainer, tokens, local)
        elif log is not None:
            log.unlink(missing_ok=True)
        # The single runner's signal handling: finish the step, checkpoint, stop.
        self.run_trainer_with_interruption_handling(trainer)  # type: ignore[arg-type]
        if main:
            self._export_and_evaluate(trainer)
        barrier(self.context, "rank 0 exporting and evaluating the SAEs")
        return self.saes

    def _export_and_evaluate(self, trainer: E2EMultiSAETrainer) -> None:
        cfg = self.cfg
        if cfg.output_path is not None:
            for name in self.saes:
                self._export(name)
            top = Path(cfg.output_path) / RUNNER_CFG_FILENAME
            atomic_write_text(top, json.dumps(cfg.to_dict(), default=str))
            remove_local_paths(cfg.output_path)
        for name, terms in trainer.last_losses.items():
            logger.info(f"SAE {name!r} on the last training batch: {terms}")
        if cfg.eval_at_end and self.eval_tokens is not None:
            self._final_evaluation()
        if cfg.logger.log_to_wandb:
            wandb.finish()

    def _export(self, name: str) -> None:
        assert self.cfg.output_path is not None and self.multi_trainer is not None
        sparsity = self.multi_trainer.trainers[name].log_feature_sparsity

        def write(folder: str) -> None:
            self.saes[name].save_inference_model(folder)
            save_file({"sparsity": sparsity}, Path(folder) / SPARSITY_FILENAME)
            runner_cfg = Path(folder) / RUNNER_CFG_FILENAME
            runner_cfg.write_text(json.dumps(self.cfg.to_dict(), default=str))
            remove_local_paths(folder)

        export_atomically(str(Path(self.cfg.output_path) / name), write)

    def _evaluate_during_training(self, trainer: E2EMultiSAETrainer) -> None:
        """Each training SAE alone (with its activation scaler) and, for a joint run whose
        SAEs hold their whole scaling, all together; logged and kept in ``eval_history``."""
        if self.eval_tokens is None:
            return
        cfg, step = self.cfg, trainer.n_steps_taken
        batches = self.eval_tokens.split(cfg.eval_sequences_per_batch)
        for name, sae in self.saes.items():
            result = evaluate_sae(
                sae,
                self.model,
                batches,
                hook_name=cfg.hook_names_per_sae[name],
                alive_window_tokens=None,
                logits_chunk_size=cfg.kl_chunk_size,
                activation_scaler=trainer.trainers[name].activation_scaler,
                positions=self.positions,
            )
            self.multi_eval_history.append((step, name, result))
            logger.info(f"SAE {name!r} after step {step}:\n{result.format_table()}")
            self._log_evaluation(name, result, trainer.n_training_steps)
        scaled = any(
            t.activation_scaler.scaling_factor is not None for t in trainer.trainers.values()
        )
        if self.multi_plan.mode == "joint" and not scaled:
            joint = evaluate_sae(
                dict(self.saes),
                self.model,
                batches,
                hook_names=cfg.hook_names_per_sae,
                logits_chunk_size=cfg.kl_chunk_size,
                positions=self.positions,
            )
            self.multi_eval_history.append((step, "joint", joint))
            logger.info(f"the SAEs together after step {step}:\n{joint.format_table()}")
            self._log_evaluation("joint", joint, trainer.n_training_steps)

    def _final_evaluation(self) -> None:
        """Each SAE alone, as exported (``eval.json`` in its folder); for a joint run, all
        of them spliced together too (``joint_eval.json``)."""
        cfg = self.cfg
        assert self.eval_tokens is not None
        batches = self.eval_tokens.split(cfg.eval_sequences_per_batch)
        exported = {}
        for name, sae in self.saes.items():
            folder = None if cfg.output_path is None else str(Path(cfg.output_path) / name)
            exported[name] = load_exported_sae(sae, folder, cfg.device)
            result = evaluate_sae(
                exported[name],
                self.model,
                batches,
                hook_name=cfg.hook_names_per_sae[name],
                alive_window_tokens=None,
                logits_chunk_size=cfg.kl_chunk_size,
                positions=self.positions,
            )
            self.eval_results[name] = result
            logger.info(f"final evaluation of SAE {name!r} alone:\n{result.format_table()}")
            self._log_evaluation(name, result, self._steps_done())
            if folder is not None:
                record_exported_l0(folder, result.l0)
                result.save_json(Path(folder) / EVAL_FILENAME)
        if self.multi_plan.mode != "joint":
            return
        joint = evaluate_sae(
            exported,
            self.model,
            batches,
            hook_names=cfg.hook_names_per_sae,
            logits_chunk_size=cfg.kl_chunk_size,
            positions=self.positions,
        )
        self.joint_eval = joint
        logger.info(f"final evaluation of the SAEs spliced together:\n{joint.format_table()}")
        self._log_evaluation("joint", joint, self._steps_done())
        if cfg.output_path is not None:
            joint.save_json(Path(cfg.output_path) / JOINT_EVAL_FILENAME)

    def _steps_done(self) -> int:
        return 0 if self.multi_trainer is None else self.multi_trainer.n_training_steps

    def _log_evaluation(self, name: str, result: EvalResult | JointEvalResult, step: int) -> None:
        """An evaluation's numbers to wandb (when it is on) as ``<name>/eval/<metric>``."""
        if not self.cfg.logger.log_to_wandb:
            return
        row = {}
        for key, value in result.to_dict().items():
            # A joint result holds one number per SAE under l0 and explained_variance.
            values = value if isinstance(value, dict) else {"": value}
            for sae, number in values.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    row[f"{name}/eval/{key}" + (f"/{sae}" if sae else "")] = number
        wandb.log(row, step=step)

    def _set_metadata(self) -> None:
        cfg, plan = self.cfg, self.multi_plan
        for name, sae in self.saes.items():
            meta = sae.cfg.metadata
            meta.dataset_path = cfg.dataset_path
            meta.hook_name = cfg.hook_names_per_sae[name]
            meta.model_name = cfg.model_name
            meta.model_class_name = cfg.model_class_name
            meta.hook_head_index = cfg.hook_head_index
            meta.context_size = cfg.context_size
            meta.seqpos_slice = cfg.seqpos_slice
            meta.model_from_pretrained_kwargs = cfg.model_from_pretrained_kwargs
            meta.prepend_bos = cfg.prepend_bos
            meta.exclude_special_tokens = cfg.exclude_special_tokens
            meta.sequence_separator_token = cfg.sequence_separator_token
            meta.disable_concat_sequences = cfg.disable_concat_sequences
            downstream = plan.downstream_hooks if plan.mode == "joint" else None
            meta.e2e_objective = {
                **objective_metadata(
                    cfg,
                    self.objective,
                    self.positions,
                    downstream or plan.plans[name].downstream_hooks,
                ),
                # Several SAEs per run: how they were spliced, and where the others sat.
                "splice": plan.mode,
                "sae_name": name,
                "other_saes": {
                    other: cfg.hook_names_per_sae[other] for other in self.saes if other != name
                },
            }
