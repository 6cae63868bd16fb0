"""``E2EMultiSAETrainingRunner``: several SAEs in one e2e run, one export folder per SAE.

The runner of every run (``runs.runner``) with an ``E2EMultiRunnerConfig``: its SAEs are
``saes``, each at its hook in ``hook_names``, spliced ``independent`` or ``joint``; each is
written to ``<output_path>/<name>/`` in SAELens' format and evaluated alone there
(``eval.json``) and, for a joint run, all of them together (``<output_path>/joint_eval.json``).
This class only gives the constructor its ``override_saes`` and ``run()`` its return type.
"""

from __future__ import annotations

from typing import Any

from sae_lens.saes.sae import TrainingSAE

from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner
from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig


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
        super().__init__(cfg, override_model, override_dataset, override_saes=override_saes)

    def run(self) -> dict[str, TrainingSAE[Any]]:
        """Train, write each SAE to ``<output_path>/<name>`` (if set) and return them by name."""
        return super().run()
