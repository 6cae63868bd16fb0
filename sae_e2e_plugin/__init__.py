"""End-to-end sparse dictionary learning (Braun et al. 2024) for SAELens.

Set ``loss="e2e"`` (or ``"e2e_downstream"``) on an ``E2ERunnerConfig`` and run it
with ``E2ESAETrainingRunner``: the SAE is trained so that the language model's
next-token distribution with the SAE's reconstruction spliced in stays close
to the original (KL divergence).
"""

__version__ = "0.1.0"

from sae_e2e_plugin.builtin import load_builtin_dataset, load_builtin_model
from sae_e2e_plugin.config import E2ERunnerConfig
from sae_e2e_plugin.evals import DownstreamMetrics, EvalResult, evaluate_sae
from sae_e2e_plugin.loading import (
    convert_reference_checkpoint,
    reference_format_disk_loader,
    reference_format_loader,
)
from sae_e2e_plugin.losses import chunked_kl_orig_to_patched, kl_orig_to_patched
from sae_e2e_plugin.objectives import (
    ObjectiveInputs,
    ObjectiveOutput,
    available_objectives,
    register_objective,
)
from sae_e2e_plugin.runner import E2ESAETrainingRunner
from sae_e2e_plugin.trainer import E2ESAETrainer, NonFiniteLossError

__all__ = [
    "DownstreamMetrics",
    "E2ERunnerConfig",
    "E2ESAETrainer",
    "E2ESAETrainingRunner",
    "EvalResult",
    "NonFiniteLossError",
    "ObjectiveInputs",
    "ObjectiveOutput",
    "__version__",
    "available_objectives",
    "chunked_kl_orig_to_patched",
    "convert_reference_checkpoint",
    "evaluate_sae",
    "kl_orig_to_patched",
    "load_builtin_dataset",
    "load_builtin_model",
    "reference_format_disk_loader",
    "reference_format_loader",
    "register_objective",
]
