"""The same config gives the same weights whichever way it arrives: from flags (the command
line) or Python, with the model loaded by the run or handed to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset

import sae_e2e_plugin.runs.runner as runner_module
from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.cli import parse_field_flags
from sae_e2e_plugin.training.config.fields import config_from_fields

STEPS = 3


def flags_cfg(tmp_path: Path) -> Any:
    """``make_cfg``'s run as ``sae-e2e train`` flags would give it."""
    flags = ["--model_name", "tiny", "--hook_name", "blocks.1.hook_resid_pre"]
    flags += ["--dataset_path", "unused", "--is_dataset_tokenized", "true", "--context_size", "8"]
    flags += ["--prepend_bos", "false", "--train_batch_size_tokens", str(4 * CONTEXT)]
    flags += ["--training_tokens", str(STEPS * 4 * CONTEXT), "--n_batches_in_buffer", "4"]
    flags += ["--store_batch_size_prompts", "4", "--lr", "3e-3", "--device", "cpu", "--seed", "0"]
    flags += ["--checkpoint_path", str(tmp_path / "checkpoints"), "--verbose", "false"]
    flags += ["--output_path", str(tmp_path / "output"), "--loss", "e2e", "--n_eval_batches", "0"]
    flags += ["--sae.d_in", "16", "--sae.d_sae", "64", "--sae.l1_coefficient", "1e-3"]
    flags += ["--logger.log_to_wandb", "false"]
    return config_from_fields(parse_field_flags(flags))


def test_flags_and_python_give_the_same_weights_whoever_loads_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    given = E2ESAETrainingRunner(
        make_cfg(tmp_path / "api", training_tokens=STEPS * 4 * CONTEXT, n_eval_batches=0),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    start = given.sae.W_enc.detach().clone()
    given.run()

    # As `sae-e2e train` runs: the model is loaded inside the runner, after the seed is set.
    def load_inside(cfg: Any, model: Any, dataset: Any) -> tuple[Any, Any]:
        return tiny_model(seed=0), dataset

    monkeypatch.setattr(runner_module, "resolve_builtins", load_inside)
    loaded = E2ESAETrainingRunner(flags_cfg(tmp_path / "cli"), override_dataset=token_dataset())
    torch.testing.assert_close(loaded.sae.W_enc, start, rtol=0, atol=0)
    loaded.run()
    for name, value in given.sae.state_dict().items():
        torch.testing.assert_close(loaded.sae.state_dict()[name], value, rtol=0, atol=0)
