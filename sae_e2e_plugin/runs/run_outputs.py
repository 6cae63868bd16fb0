"""What a run leaves behind: each SAE's metadata, its export, its evaluations and their logs.

``RunOutputs`` is the runner's half that comes after training (mixed into
``E2ESAETrainingRunner``). A single-SAE run exports to ``output_path`` itself and logs its
evaluation as ``eval/<metric>``; a run of several exports each SAE to ``<output_path>/<name>/``,
logs ``<name>/eval/<metric>`` and, for a joint run, also evaluates every SAE spliced in together
(``<output_path>/joint_eval.json``, logged as ``joint/eval/<metric>``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import wandb
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.constants import RUNNER_CFG_FILENAME
from sae_lens.saes.sae import SAE, TrainingSAE
from sae_lens.training.activation_scaler import ActivationScaler

from sae_e2e_plugin.core.multi_splice import MultiSplicePlan
from sae_e2e_plugin.core.positions import PositionFilter
from sae_e2e_plugin.evaluation.evaluate import evaluate_sae
from sae_e2e_plugin.evaluation.metrics import EvalResult, JointEvalResult
from sae_e2e_plugin.run_files import EVAL_FILENAME, atomic_write_text
from sae_e2e_plugin.runs.export import load_exported_sae, record_exported_l0, remove_local_paths
from sae_e2e_plugin.runs.output_folder import export_atomically
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig
from sae_e2e_plugin.training.loop.trainer import E2ETrainer
from sae_e2e_plugin.training.objectives import ResolvedObjective
from sae_e2e_plugin.version import __version__

logger = logging.getLogger(__name__)

ONE_SAE = "sae"
"""The name of a single-SAE run's one SAE (in its trainer and its step pass)."""

JOINT_EVAL_FILENAME = "joint_eval.json"
"""In ``output_path`` of a joint run: every SAE spliced together on the held-out tokens."""

SAELENS_METADATA = (
    "dataset_path",
    "model_name",
    "model_class_name",
    "hook_head_index",
    "context_size",
    "seqpos_slice",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "sequence_separator_token",
    "disable_concat_sequences",
)
"""The run's fields SAELens' runner copies into an SAE's metadata (besides its hook)."""


class RunOutputs:
    """Metadata, export and evaluation of a run's SAEs (the runner sets the attributes below)."""

    cfg: E2ERunnerConfig[Any]
    model: Any
    trains_several_saes: bool
    hooks: dict[str, str]
    hooks_out: dict[str, str]
    saes: dict[str, TrainingSAE[Any]]
    plan: MultiSplicePlan
    objective: ResolvedObjective
    positions: PositionFilter
    eval_tokens: torch.Tensor | None
    sae: TrainingSAE[Any]

    eval_history: list[tuple[int, str, EvalResult | JointEvalResult]]
    """(step, SAE name or "joint", result) of each evaluation during training, and the final ones."""
    eval_results: dict[str, EvalResult]
    """Each exported SAE's final evaluation alone, by name."""
    joint_eval: JointEvalResult | None = None
    """A joint run's final evaluation of every SAE spliced in together."""

    def export_folders(self) -> dict[str, str | None]:
        """Where each SAE is exported (None: ``output_path`` is not set)."""
        out = self.cfg.output_path
        if not self.trains_several_saes:
            return {name: out for name in self.hooks}
        return {name: None if out is None else str(Path(out) / name) for name in self.hooks}

    def set_metadata(self) -> None:
        """What SAELens' runner records in an SAE's metadata, with each SAE's own hook, and how
        it was trained (``metadata.e2e_objective``)."""
        cfg, plan = self.cfg, self.plan
        for name, sae in self.saes.items():
            for field in SAELENS_METADATA:
                setattr(sae.cfg.metadata, field, getattr(cfg, field))
            sae.cfg.metadata.hook_name = self.hooks[name]
            if name in self.hooks_out:  # a transcoder: where SAELens' add_sae puts its output
                sae.cfg.metadata.hook_name_out = self.hooks_out[name]
            downstream = plan.downstream_hooks if plan.mode == "joint" else None
            sae.cfg.metadata.e2e_objective = objective_metadata(
                cfg, self.objective, self.positions, downstream or plan.plans[name].downstream_hooks
            )
            if self.trains_several_saes:  # how they were spliced, and where the others sat
                sae.cfg.metadata.e2e_objective |= {
                    "splice": plan.mode,
                    "sae_name": name,
                    "other_saes": {o: hook for o, hook in self.hooks.items() if o != name},
                }

    def evaluate(
        self,
        activation_scaler: ActivationScaler | None = None,
        sae: SAE[Any] | None = None,
        name: str | None = None,
    ) -> EvalResult:
        """An SAE's metrics on the held-out tokens (``evaluate_sae``) at the hook of SAE ``name``
        (default: the first); ``sae`` defaults to that training SAE."""
        if self.eval_tokens is None:
            raise ValueError("n_eval_batches=0: there are no held-out tokens to evaluate on.")
        name = name or next(iter(self.hooks))
        return evaluate_sae(
            sae if sae is not None else self.saes[name],
            self.model,
            self.eval_tokens.split(self.cfg.eval_sequences_per_batch),
            hook_name=self.hooks[name],
            hook_name_out=self.hooks_out.get(name),
            alive_window_tokens=None,
            logits_chunk_size=self.cfg.kl_chunk_size,
            activation_scaler=activation_scaler,
            positions=self.positions,
        )

    def _evaluate_jointly(self, saes: dict[str, Any]) -> JointEvalResult:
        assert self.eval_tokens is not None
        return evaluate_sae(
            saes,
            self.model,
            self.eval_tokens.split(self.cfg.eval_sequences_per_batch),
            hook_names=self.hooks,
            alive_window_tokens=None,  # as each SAE's own evaluation counts them
            logits_chunk_size=self.cfg.kl_chunk_size,
            positions=self.positions,
        )

    def evaluate_during_training(self, trainer: E2ETrainer) -> None:
        """Each training SAE alone (with its activation scaler) and, for a joint run whose
        SAEs hold their whole scaling, all together; logged and kept in ``eval_history``."""
        if self.eval_tokens is None:
            return
        step = trainer.n_steps_taken
        for name, sae_trainer in trainer.trainers.items():
            result = self.evaluate(sae_trainer.activation_scaler, name=name)
            self._record(step, name, result)
            self._log_evaluation(name, result, trainer.n_training_steps)
        scaled = any(
            t.activation_scaler.scaling_factor is not None for t in trainer.trainers.values()
        )
        if self.plan.mode == "joint" and self.trains_several_saes and not scaled:
            joint = self._evaluate_jointly(dict(self.saes))
            self._record(step, "joint", joint)
            self._log_evaluation("joint", joint, trainer.n_training_steps)

    def _record(self, step: int, name: str, result: Any, final: bool = False) -> None:
        self.eval_history.append((step, name, result))
        who = f"SAE {name!r}" if self.trains_several_saes else "the SAE"
        who = "the SAEs spliced in together" if name == "joint" else who
        when = "as exported" if final else f"after step {step}"
        logger.info(
            f"{'final ' if final else ''}evaluation on held-out tokens of {who} {when}:\n"
            f"{result.format_table()}"
        )

    def export_and_evaluate(self, trainer: E2ETrainer) -> None:
        """Rank 0's end of a run: each SAE exported, evaluated as exported, wandb finished."""
        cfg = self.cfg
        for name, folder in self.export_folders().items():
            if folder is not None:
                self._export(name, folder, trainer)
        if self.trains_several_saes and cfg.output_path is not None:
            top = Path(cfg.output_path) / RUNNER_CFG_FILENAME
            atomic_write_text(top, json.dumps(cfg.to_dict(), default=str))
            remove_local_paths(cfg.output_path)
        logger.info(first_to_last(trainer))
        # Evaluation is rank 0's alone: the others wait (within distributed_timeout_s).
        if cfg.eval_at_end and self.eval_tokens is not None:
            self.evaluate_exports(trainer.n_steps_taken, trainer.n_training_steps)
        if cfg.logger.log_to_wandb:
            wandb.finish()

    def _export(self, name: str, folder: str, trainer: E2ETrainer) -> None:
        """SAELens' export, written atomically (``runs.output_folder.export_atomically``), with
        ``runner_cfg.json`` rewritten without local paths (it is what gets uploaded)."""
        sparsity = trainer.trainers[name].log_feature_sparsity

        def write(staging: str) -> None:
            # SAELens names the wandb upload after the runner's ``sae``: this one's, for now.
            with self.as_the_runners_sae(name):
                self.save_final_sae(self.saes[name], staging, sparsity)
            remove_local_paths(staging)

        export_atomically(folder, write)

    @contextmanager
    def as_the_runners_sae(self, name: str) -> Iterator[None]:
        """SAE ``name`` as the runner's ``sae`` for the block: SAELens' runner methods (its
        compile, its export's wandb upload) act on ``self.sae``."""
        first, self.sae = self.sae, self.saes[name]
        try:
            yield
        finally:
            self.sae = first

    def save_final_sae(
        self, sae: TrainingSAE[Any], output_path: str, log_feature_sparsity: Any = None
    ) -> None:
        """SAELens' own export of one SAE into ``output_path`` (inference weights, config,
        sparsity, the run's config)."""
        LanguageModelSAETrainingRunner.save_final_sae(
            self,  # type: ignore[arg-type]
            sae,
            output_path,
            log_feature_sparsity,
        )

    def evaluate_exports(self, steps: int = 0, logged: int | None = None) -> None:
        """Each SAE alone, as exported (``eval.json`` in its folder; activation scaling folded
        in, batch top-k as JumpReLU: the file users load); a joint run, all of them spliced in
        together too (``joint_eval.json``). ``eval.json`` marks a finished run: written last.
        ``steps``: the step the results are kept under; ``logged``: the wandb step (None: the
        results are not logged, as when a sweep evaluates finished runs again)."""
        folders, exported = self.export_folders(), {}
        for name, sae in self.saes.items():
            folder = folders[name]
            exported[name] = load_exported_sae(sae, folder, self.cfg.device)
            result = self.evaluate(sae=exported[name], name=name)
            self.eval_results[name] = result
            self._record(steps, name, result, final=True)
            self._log_evaluation(name, result, logged)
            if folder is not None:
                record_exported_l0(folder, result.l0)
                path = result.save_json(Path(folder) / EVAL_FILENAME)
                logger.info(f"saved the evaluation to {path}")
        if self.plan.mode != "joint" or not self.trains_several_saes:
            return
        self.joint_eval = joint = self._evaluate_jointly(exported)
        self._record(steps, "joint", joint, final=True)
        self._log_evaluation("joint", joint, logged)
        if self.cfg.output_path is not None:
            joint.save_json(Path(self.cfg.output_path) / JOINT_EVAL_FILENAME)

    def _log_evaluation(
        self, name: str, result: EvalResult | JointEvalResult, step: int | None
    ) -> None:
        """An evaluation's numbers to wandb (when it is on and ``step`` is given) as
        ``eval/<metric>`` (several SAEs: ``<name>/eval/<metric>``)."""
        if not self.cfg.logger.log_to_wandb or step is None:
            return
        prefix = f"{name}/eval/" if self.trains_several_saes else "eval/"
        row = {}
        for key, value in result.to_dict().items():
            # A joint result holds one number per SAE under l0 and explained_variance.
            values = value if isinstance(value, dict) else {"": value}
            for sae, number in values.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    row[prefix + key + (f"/{sae}" if sae else "")] = number
        wandb.log(row, step=step)


def objective_metadata(
    cfg: E2ERunnerConfig[Any],
    objective: ResolvedObjective,
    positions: PositionFilter,
    downstream_hooks: Any,
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


def first_to_last(trainer: E2ETrainer) -> str:
    """One line: each SAE's loss terms on the first and on the last training batch."""
    lines = []
    for name, last in trainer.last_losses.items():
        first = trainer.first_losses.get(name, {})
        terms = [
            f"{term} {first[term]:.4g} -> {value:.4g}"
            for term, value in last.items()
            if term in first and not term.startswith("downstream_mse_loss/")
        ]
        who = "" if trainer.one_sae_layout else f"SAE {name!r}: "
        lines.append(who + ", ".join(terms))
    return "training batches, first step -> last step: " + "; ".join(lines)
