"""End-to-end sparse dictionary learning (Braun et al. 2024) for SAELens.

Set ``loss="e2e"`` (or ``"e2e_downstream"``) on an ``E2ERunnerConfig`` and run it
with ``E2ESAETrainingRunner``: the SAE is trained so that the language model's
next-token distribution with the SAE's reconstruction spliced in stays close
to the original (KL divergence).

This module is the public API; ``docs/architecture.md`` maps the subpackages behind it.
No module of the package imports this one.
"""

import sae_e2e_plugin.transcoders as transcoders
from sae_e2e_plugin.assets.corpora import load_builtin_dataset
from sae_e2e_plugin.assets.model import (
    builtin_hf_model_folder,
    load_builtin_hf_model,
    load_builtin_model,
)
from sae_e2e_plugin.core.losses import (
    CleanLogProbs,
    chunked_kl_orig_to_patched,
    clean_log_probs,
    kl_orig_to_patched,
)
from sae_e2e_plugin.evaluation.evaluate import evaluate_sae, evaluate_saes_jointly
from sae_e2e_plugin.evaluation.metrics import DownstreamMetrics, EvalResult, JointEvalResult
from sae_e2e_plugin.features.dashboard import inspect_sae
from sae_e2e_plugin.features.options import InspectOptions
from sae_e2e_plugin.interop.reference import (
    convert_reference_checkpoint,
    reference_format_disk_loader,
)
from sae_e2e_plugin.interop.reference_hub import reference_format_loader
from sae_e2e_plugin.runs.multi_runner import E2EMultiSAETrainingRunner
from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig
from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig
from sae_e2e_plugin.training.loop.sae_trainer import E2ESAETrainer, NonFiniteLossError
from sae_e2e_plugin.training.objectives import (
    ObjectiveInputs,
    ObjectiveOutput,
    available_objectives,
    register_objective,
)
from sae_e2e_plugin.training.timing import PhaseTimer
from sae_e2e_plugin.transcoders import (
    BatchTopKTrainingTranscoder,
    BatchTopKTrainingTranscoderConfig,
    JumpReLUTrainingTranscoder,
    JumpReLUTrainingTranscoderConfig,
    StandardTrainingTranscoder,
    StandardTrainingTranscoderConfig,
    TopKTrainingTranscoder,
    TopKTrainingTranscoderConfig,
    TranscoderStepInput,
    pack_transcoder_batch,
)
from sae_e2e_plugin.version import __version__

__all__ = [
    "CleanLogProbs",
    "DownstreamMetrics",
    "E2EMultiRunnerConfig",
    "E2EMultiSAETrainingRunner",
    "E2ERunnerConfig",
    "E2ESAETrainer",
    "E2ESAETrainingRunner",
    "EvalResult",
    "InspectOptions",
    "JointEvalResult",
    "NonFiniteLossError",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "PhaseTimer",
    "__version__",
    "available_objectives",
    "builtin_hf_model_folder",
    "chunked_kl_orig_to_patched",
    "clean_log_probs",
    "convert_reference_checkpoint",
    "evaluate_sae",
    "evaluate_saes_jointly",
    "inspect_sae",
    "kl_orig_to_patched",
    "load_builtin_dataset",
    "load_builtin_hf_model",
    "load_builtin_model",
    "reference_format_disk_loader",
    "reference_format_loader",
    "register_objective",
]
__all__ += transcoders.__all__  # the transcoders' public names, imported above
