"""Resume continues the same run or is refused, naming each changed field with old and new value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from sae_lens import StandardTrainingSAEConfig, TopKTrainingSAEConfig

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.training.loop.checkpoints import ResumeError
from sae_e2e_plugin.training.loop.run_identity import run_identity

STEP_TOKENS = 4 * CONTEXT


def runner(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(
        training_tokens=4 * STEP_TOKENS, n_eval_batches=0, n_checkpoints=1
    )
    cfg = make_cfg(tmp_path, **(fields | overrides))
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint part-way through the 4 steps of make_cfg's run (standard SAE, d_sae 64, lr 3e-3)."""
    run = runner(tmp_path_factory.mktemp("first"))
    run.run()
    assert run.cfg.checkpoint_path is not None
    (found,) = Path(run.cfg.checkpoint_path).iterdir()
    assert int(found.name) < 4 * STEP_TOKENS  # mid-run
    return found


CHANGES: list[tuple[dict[str, Any], list[str]]] = [
    ({"lr": 1e-3}, ["lr: 0.003 -> 0.001"]),
    ({"seed": 7}, ["seed: 0 -> 7"]),
    (
        {"hook_name": "blocks.2.hook_resid_pre"},
        ["hook_name: 'blocks.1.hook_resid_pre' -> 'blocks.2"],
    ),
    ({"loss": "local"}, ["loss: 'e2e' -> 'local'"]),
    ({"kl_coefficient": 0.5}, ["kl_coefficient: 1.0 -> 0.5"]),
    (
        {"training_tokens": 6 * STEP_TOKENS},
        [f"training_tokens: {4 * STEP_TOKENS} -> {6 * STEP_TOKENS}"],
    ),
    ({"seqpos_slice": (1, None)}, ["seqpos_slice: [None] -> [1, None]"]),
    ({"context_size": CONTEXT // 2}, [f"context_size: {CONTEXT} -> {CONTEXT // 2}"]),
    (
        {"sae_cfg": StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3)},
        ["sae.d_sae: 64 -> 32"],
    ),
    (
        {"sae_cfg": StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64, l1_coefficient=5e-3)},
        ["sae.l1_coefficient: 0.001 -> 0.005"],
    ),
    (
        {"sae_cfg": TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4)},
        ["sae.architecture: 'standard' -> 'topk'"],
    ),
    ({"lr": 1e-3, "seed": 3}, ["lr: 0.003 -> 0.001", "seed: 0 -> 3"]),
]


@pytest.mark.parametrize(("change", "named"), CHANGES, ids=[str(c[0])[:40] for c in CHANGES])
def test_resume_with_a_changed_field_is_refused_by_name(
    tmp_path: Path, checkpoint: Path, change: dict[str, Any], named: list[str]
) -> None:
    with pytest.raises(ResumeError) as error:
        runner(tmp_path, resume_from_checkpoint=str(checkpoint), **change)
    message = str(error.value)
    assert "was written by a different run" in message and str(checkpoint) in message
    for text in named:
        assert text in message
    assert "damaged" not in message
    assert not (tmp_path / "output").exists()  # refused before anything was written


def test_fields_outside_the_identity_may_change_on_resume(tmp_path: Path, checkpoint: Path) -> None:
    resumed = runner(
        tmp_path, resume_from_checkpoint=str(checkpoint), n_checkpoints=0, kl_chunk_size=5
    )
    resumed.run()
    assert resumed.trainer is not None and resumed.trainer.n_steps_taken == 4


def test_a_checkpoint_that_trained_every_token_is_refused(tmp_path: Path) -> None:
    run = runner(
        tmp_path / "a", training_tokens=2 * STEP_TOKENS, n_checkpoints=0, save_final_checkpoint=True
    )
    run.run()
    assert run.cfg.checkpoint_path is not None
    (final,) = Path(run.cfg.checkpoint_path).iterdir()
    with pytest.raises(ResumeError, match=r"has already trained 64 tokens and training_tokens=64"):
        runner(tmp_path / "b", training_tokens=2 * STEP_TOKENS, resume_from_checkpoint=str(final))


def test_the_identity_holds_each_sae_field_but_where_it_lives() -> None:
    cfg = make_cfg(Path("/tmp/x"), seqpos_slice=(1, None))
    identity = run_identity(cfg.to_dict())
    assert identity["seqpos_slice"] == [1, None] and identity["sae.d_sae"] == 64
    assert identity["sae.architecture"] == "standard"
    assert "sae.device" not in identity and "output_path" not in identity
    assert "model_from_pretrained_kwargs" not in identity
