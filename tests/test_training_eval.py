"""Evaluation during training: held-out tokens, cadence, JSON, and no effect on training."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.training.loop.trainer import E2ETrainer


def unique_rows_dataset(n_rows: int = 48) -> Any:
    # Row i starts with token i, so every sequence is distinguishable.
    dataset = token_dataset(n_rows=n_rows, seed=7)
    rows = [[i % 40] + row[1:] for i, row in enumerate(dataset["tokens"])]
    return type(dataset).from_dict({"tokens": rows})


def run(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(
        training_tokens=6 * 4 * CONTEXT, n_eval_batches=2, eval_batch_size_prompts=3
    )
    fields.update(overrides)
    runner = E2ESAETrainingRunner(
        make_cfg(tmp_path, **fields),
        override_model=tiny_model(),
        override_dataset=token_dataset(n_rows=64, seed=9),
    )
    runner.run()
    return runner


def test_evaluation_does_not_change_the_trained_weights(tmp_path: Path) -> None:
    with_eval = run(tmp_path / "on", eval_every_n_steps=2, eval_at_end=True)
    without = run(tmp_path / "off", eval_every_n_steps=0, eval_at_end=False)
    assert [step for step, _, _ in with_eval.eval_history] == [2, 4, 6, 6]
    assert without.eval_history == []
    for (name, a), (_, b) in zip(
        with_eval.sae.state_dict().items(), without.sae.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_final_evaluation_is_saved_as_json_with_wandb_off(tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.INFO, logger="sae_e2e_plugin"):
        runner = run(tmp_path)
    assert not runner.cfg.logger.log_to_wandb
    saved = json.loads((Path(runner.cfg.output_path or "") / "eval.json").read_text())
    _, _, final = runner.eval_history[-1]
    assert saved["n_tokens"] == 2 * 3 * CONTEXT == final.n_tokens
    assert saved["kl_orig_patched"] == final.kl_orig_patched > 0
    assert saved["ce_loss_increase"] == final.ce_loss_increase
    # The library logs the table (the command line shows the package's INFO logs).
    assert (
        "final evaluation on held-out tokens" in caplog.text and "CE loss increase" in caplog.text
    )


def test_training_never_consumes_the_held_out_sequences(tmp_path: Path) -> None:
    dataset = unique_rows_dataset()
    cfg = make_cfg(
        tmp_path, training_tokens=8 * 4 * CONTEXT, n_eval_batches=2, eval_batch_size_prompts=4
    )
    runner = E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=dataset)
    seen: list[torch.Tensor] = []
    original = E2ETrainer.step

    def spy(trainer: E2ETrainer, batch: torch.Tensor) -> Any:
        seen.append(batch.clone())
        return original(trainer, batch)

    E2ETrainer.step = spy  # type: ignore[method-assign]
    try:
        runner.run()
    finally:
        E2ETrainer.step = original  # type: ignore[method-assign]
    assert runner.eval_tokens is not None
    held_out = {tuple(row.tolist()) for row in runner.eval_tokens}
    trained = {tuple(row.tolist()) for batch in seen for row in batch}
    assert len(held_out) == 8 and len(trained) == 32
    assert not held_out & trained


def test_wandb_gets_every_loss_term_by_name_and_the_evaluations(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import wandb

    logged: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: None)
    monkeypatch.setattr(wandb, "finish", lambda: None)
    monkeypatch.setattr(wandb, "log", lambda data, step=None: logged.append(dict(data)))
    monkeypatch.setattr(wandb, "Histogram", lambda *args, **kwargs: None)
    from sae_lens import LoggingConfig

    run(
        tmp_path,
        loss="e2e_downstream",
        eval_every_n_steps=3,
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(
            log_to_wandb=True, wandb_log_frequency=1, eval_every_n_wandb_logs=1000
        ),
    )
    keys = set().union(*logged)
    for hook in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"):
        assert f"losses/downstream_mse_loss/{hook}" in keys
        assert f"metrics/downstream_mse/{hook}" in keys
    assert {
        "losses/kl_loss",
        "losses/l1_loss",
        "metrics/kl_orig_patched",
        "metrics/local_mse",
    } <= keys
    evals = [entry for entry in logged if "eval/ce_loss_increase" in entry]
    assert len(evals) == 3  # after steps 3 and 6, and the final evaluation
