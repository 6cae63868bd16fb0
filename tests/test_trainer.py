"""End-to-end training on tiny random models: gradients, learning, every architecture, resume."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from datasets import Dataset
from transformer_lens import HookedTransformer

from sae_e2e_plugin import (
    E2ESAETrainingRunner,
    NonFiniteLossError,
    ObjectiveInputs,
    ObjectiveOutput,
    register_objective,
)
from sae_e2e_plugin.core.losses import kl_orig_to_patched, mse_mean
from sae_e2e_plugin.core.model_splice import run_clean, run_patched
from sae_e2e_plugin.core.splice import (
    logits_from_final_resid,
    plan_splice,
    run_prefix,
)
from sae_e2e_plugin.runs.output_folder import LOCK_FILENAME


def runner_for(
    tmp_path: Path,
    dataset: Dataset | None = None,
    model: HookedTransformer | None = None,
    **overrides: Any,
) -> E2ESAETrainingRunner:
    cfg = make_cfg(tmp_path, **overrides)
    return E2ESAETrainingRunner(
        cfg, override_model=model or tiny_model(), override_dataset=dataset or token_dataset()
    )


@torch.no_grad()
def objective_terms(runner: E2ESAETrainingRunner, tokens: torch.Tensor) -> dict[str, float]:
    """KL and downstream MSEs of the runner's SAE on ``tokens``, via the splice functions."""
    model, sae = runner.model, runner.sae
    plan = plan_splice(model, runner.cfg.hook_name, None)
    prefix = run_prefix(model, tokens, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    recon = sae(clean.acts.reshape(-1, D_MODEL)).reshape(clean.acts.shape)
    patched = run_patched(model, prefix, plan, recon)
    assert clean.final_resid is not None
    terms = {
        "kl": kl_orig_to_patched(
            logits_from_final_resid(model, clean.final_resid),
            logits_from_final_resid(model, patched.final_resid),
        ).item()
    }
    for name in plan.downstream_hooks:
        terms[name] = mse_mean(patched.downstream[name], clean.downstream[name]).item()
    return terms


def fixed_batch_dataset() -> Dataset:
    # Exactly one batch of 4 sequences: the store wraps around, so every step sees it. Runs
    # on it take no held-out sequences (n_eval_batches=0): 4 rows leave none to hold out.
    return token_dataset(n_rows=4, seed=3)


def test_step_freezes_the_model_and_moves_every_sae_parameter(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, training_tokens=4 * CONTEXT)
    lm_before = {n: p.detach().clone() for n, p in runner.model.named_parameters()}
    sae_before = {n: p.detach().clone() for n, p in runner.sae.named_parameters()}
    runner.run()
    for name, param in runner.model.named_parameters():
        assert torch.equal(param, lm_before[name]), name
        assert param.grad is None and not param.requires_grad, name
    for name, param in runner.sae.named_parameters():
        assert not torch.equal(param, sae_before[name]), f"SAE parameter {name} did not change"
    assert runner.trainer is not None
    optimizer = runner.trainer.trainers["sae"].optimizer
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in runner.sae.parameters()}


def test_thirty_e2e_steps_reduce_kl_on_a_fixed_batch(tmp_path: Path) -> None:
    dataset = fixed_batch_dataset()
    tokens = torch.tensor(dataset["tokens"])
    runner = runner_for(
        tmp_path, dataset=dataset, training_tokens=30 * 4 * CONTEXT, n_eval_batches=0
    )
    before = objective_terms(runner, tokens)
    runner.run()
    after = objective_terms(runner, tokens)
    assert after["kl"] < 0.5 * before["kl"], (before, after)


def test_e2e_downstream_reduces_kl_and_every_downstream_term(tmp_path: Path) -> None:
    dataset = fixed_batch_dataset()
    tokens = torch.tensor(dataset["tokens"])
    runner = runner_for(
        tmp_path,
        dataset=dataset,
        training_tokens=30 * 4 * CONTEXT,
        n_eval_batches=0,
        loss="e2e_downstream",
    )
    before = objective_terms(runner, tokens)
    runner.run()
    after = objective_terms(runner, tokens)
    assert set(before) == {"kl", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"}
    for name in before:
        assert after[name] < 0.7 * before[name], (name, before[name], after[name])


def test_local_loss_trains_through_the_same_trainer(tmp_path: Path) -> None:
    dataset = fixed_batch_dataset()
    tokens = torch.tensor(dataset["tokens"])
    runner = runner_for(
        tmp_path, dataset=dataset, training_tokens=30 * 4 * CONTEXT, n_eval_batches=0, loss="local"
    )
    acts = runner.model.run_with_cache(tokens)[1]["blocks.1.hook_resid_pre"].reshape(-1, D_MODEL)
    with torch.no_grad():
        before = (runner.sae(acts) - acts).pow(2).sum(-1).mean().item()
    runner.run()
    with torch.no_grad():
        after = (runner.sae(acts) - acts).pow(2).sum(-1).mean().item()
    assert after < 0.5 * before
    assert runner.sae.cfg.metadata.e2e_objective["loss"] == "local"


ARCHITECTURES: dict[str, Any] = {
    "standard": lambda: sae_lens.StandardTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3
    ),
    "topk": lambda: sae_lens.TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4),
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4),
    "jumprelu": lambda: sae_lens.JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=32),
    "gated": lambda: sae_lens.GatedTrainingSAEConfig(d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3),
    "matryoshka_batchtopk": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, k=4, matryoshka_widths=[8, 32]
    ),
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_training_architecture_trains_e2e_and_exports(
    tmp_path: Path, architecture: str
) -> None:
    runner = runner_for(
        tmp_path, sae_cfg=ARCHITECTURES[architecture](), training_tokens=3 * 4 * CONTEXT
    )
    sae = runner.run()
    assert sae.cfg.architecture() == architecture
    out = Path(runner.cfg.output_path or "")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (out / "sae_weights.safetensors").exists()
    assert cfg["metadata"]["e2e_objective"]["loss"] == "e2e"
    loaded = sae_lens.SAE.load_from_disk(str(out))
    x = torch.randn(5, D_MODEL)
    assert loaded(x).shape == (5, D_MODEL)


LOAD_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
assert "sae_e2e_plugin" not in sys.modules
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"out": sae(x), "acts": sae.encode(x)}, sys.argv[3])
assert "sae_e2e_plugin" not in sys.modules
print(type(sae).__name__, sae.cfg.architecture(), sae.cfg.metadata.e2e_objective["loss"])
"""


def test_plain_sae_lens_loads_the_export_and_reproduces_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    runner = runner_for(tmp_path, training_tokens=3 * 4 * CONTEXT, kl_coefficient=2.0)
    sae = runner.run()
    x = torch.randn(20, D_MODEL) * 3
    save_file({"x": x}, tmp_path / "x.safetensors")
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            runner.cfg.output_path,
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "y.safetensors"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["StandardSAE", "standard", "e2e"]
    theirs = load_file(tmp_path / "y.safetensors")
    sae.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs["out"], sae(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs["acts"], sae.encode(x), rtol=0, atol=1e-6)
    meta = json.loads((Path(runner.cfg.output_path or "") / "cfg.json").read_text())["metadata"]
    assert meta["e2e_objective"]["kl_coefficient"] == 2.0
    assert meta["hook_name"] == "blocks.1.hook_resid_pre"


def test_resume_continues_counters_and_ends_with_the_same_weights(tmp_path: Path) -> None:
    dataset = token_dataset(n_rows=64, seed=5)
    common: dict[str, Any] = dict(
        training_tokens=8 * 4 * CONTEXT,
        n_checkpoints=1,
        lr_scheduler_name="cosineannealing",
        lr_decay_steps=8,
        loss="e2e_downstream",
    )
    full = runner_for(tmp_path / "a", dataset=dataset, **common)
    full.run()
    assert full.trainer is not None and full.cfg.checkpoint_path is not None
    (checkpoint,) = [p for p in Path(full.cfg.checkpoint_path).iterdir() if p.is_dir()]

    resumed = runner_for(
        tmp_path / "b", dataset=dataset, resume_from_checkpoint=str(checkpoint), **common
    )
    # The interrupted run's log went on past its checkpoint: those rows are redone, not doubled.
    log_a = Path(full.cfg.output_path or "") / "training_log.jsonl"
    log_b = Path(resumed.cfg.output_path or "") / "training_log.jsonl"
    log_b.parent.mkdir(parents=True)
    log_b.write_text(log_a.read_text())
    original_fit = type(full.trainer).fit
    seen: dict[str, Any] = {}

    def spy_fit(trainer: Any) -> Any:
        seen.update(
            steps=trainer.n_training_steps,
            samples=trainer.n_training_samples,
            lr=trainer.trainers["sae"].optimizer.param_groups[0]["lr"],
            sequences=trainer.n_sequences_consumed,
        )
        return original_fit(trainer)

    type(full.trainer).fit = spy_fit  # type: ignore[method-assign]
    try:
        resumed.run()
    finally:
        type(full.trainer).fit = original_fit  # type: ignore[method-assign]
    steps_done = int(checkpoint.name) // (4 * CONTEXT)
    assert 0 < steps_done < 8
    assert seen["steps"] == steps_done and seen["samples"] == int(checkpoint.name)
    assert seen["sequences"] == 4 * steps_done
    assert 0 < seen["lr"] < full.cfg.lr
    assert resumed.trainer is not None
    assert resumed.trainer.n_training_steps == full.trainer.n_training_steps == 8
    for (name, a), (_, b) in zip(
        full.sae.state_dict().items(), resumed.sae.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    rows_a = [json.loads(line) for line in log_a.read_text().splitlines()]
    rows_b = [json.loads(line) for line in log_b.read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    for a, b in zip(rows_a, rows_b, strict=True):
        assert b.keys() == a.keys()
        assert b.pop("phase") == a.pop("phase") == "e2e"
        assert b.pop("seconds") > 0 and a.pop("seconds") > 0  # wall time differs
        assert b == pytest.approx(a, rel=1e-4)


def test_training_log_has_one_row_per_step_with_the_terms_and_batch_l0(tmp_path: Path) -> None:
    log = tmp_path / "output" / "training_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"step": 99}\n')  # left by an earlier run in the same folder
    runner = runner_for(
        tmp_path, loss="e2e", training_tokens=3 * 4 * CONTEXT, overwrite_output=True
    )
    runner.run()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in rows] == [(k, k * 4 * CONTEXT) for k in (1, 2, 3)]
    for row in rows:
        assert row["phase"] == "e2e"
        not_terms = ("step", "tokens", "phase", "total_loss", "l0", "seconds")
        terms = [v for k, v in row.items() if k not in not_terms]
        assert set(row) >= {"kl_loss", "l1_loss"}
        assert row["total_loss"] == pytest.approx(sum(terms), rel=1e-5)
        assert 0 < row["l0"] <= runner.sae.cfg.d_sae
    assert runner.trainer is not None
    assert rows[-1]["total_loss"] == pytest.approx(runner.trainer.last_losses["sae"]["total_loss"])


_nan_calls = itertools.count()


def _nan_on_fifth_step(inputs: ObjectiveInputs) -> ObjectiveOutput:
    scale = float("nan") if next(_nan_calls) == 4 else 1.0
    return ObjectiveOutput(losses={"bad": scale * inputs.reconstruction.pow(2).mean()}, metrics={})


register_objective("test_nan_on_fifth_step", _nan_on_fifth_step, needs_full_run=False)


def test_seed_fixes_the_initial_sae_whatever_ran_before(tmp_path: Path) -> None:
    first = runner_for(tmp_path / "a", seed=3)
    torch.rand(1000)  # what an earlier run of a sweep would have drawn
    second = runner_for(tmp_path / "b", seed=3)
    other = runner_for(tmp_path / "c", seed=4)
    for name, weight in first.sae.state_dict().items():
        assert torch.equal(weight, second.sae.state_dict()[name]), name
    assert not torch.equal(first.sae.W_enc, other.sae.W_enc)


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    runner = runner_for(
        tmp_path, loss="test_nan_on_fifth_step", training_tokens=6 * 4 * CONTEXT, n_checkpoints=2
    )
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 4.*last checkpoint.*intact"):
        runner.run()
    assert runner.cfg.checkpoint_path is not None
    (checkpoint,) = [p for p in Path(runner.cfg.checkpoint_path).iterdir() if p.is_dir()]
    loaded = sae_lens.TrainingSAE.load_from_disk(str(checkpoint))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    # No SAE was exported (beside the log only the folder lock, released but kept); the log
    # holds the four finished steps and nothing of the NaN one.
    output = Path(runner.cfg.output_path or "")
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILENAME, "training_log.jsonl"]
    rows = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["total_loss"]) for r in rows)


def test_expected_average_normalisation_is_undone_before_the_splice(tmp_path: Path) -> None:
    dataset = fixed_batch_dataset()
    tokens = torch.tensor(dataset["tokens"])
    sae_cfg = sae_lens.StandardTrainingSAEConfig(
        d_in=D_MODEL,
        d_sae=64,
        l1_coefficient=1e-3,
        normalize_activations="expected_average_only_in",
    )
    runner = runner_for(
        tmp_path,
        dataset=dataset,
        sae_cfg=sae_cfg,
        training_tokens=30 * 4 * CONTEXT,
        n_eval_batches=0,
        n_batches_for_norm_estimate=2,
    )
    before = objective_terms(runner, tokens)
    acts = runner.model.run_with_cache(tokens)[1]["blocks.1.hook_resid_pre"]
    expected_factor = (D_MODEL**0.5) / acts.norm(dim=-1).mean().item()
    folded: list[float] = []
    fold = runner.sae.fold_activation_norm_scaling_factor
    runner.sae.fold_activation_norm_scaling_factor = lambda f: (folded.append(f), fold(f))[1]  # type: ignore[method-assign]
    runner.run()
    # The factor was estimated from the hook's activations, then folded into the weights.
    assert folded == [pytest.approx(expected_factor, rel=1e-5)]
    assert runner.sae.cfg.normalize_activations == "none"
    assert objective_terms(runner, tokens)["kl"] < 0.5 * before["kl"]


def test_bf16_model_trains_a_float32_sae(tmp_path: Path) -> None:
    dataset = fixed_batch_dataset()
    tokens = torch.tensor(dataset["tokens"])
    runner = runner_for(
        tmp_path,
        dataset=dataset,
        training_tokens=30 * 4 * CONTEXT,
        n_eval_batches=0,
        lm_dtype="bfloat16",
    )
    assert runner.model.W_U.dtype == torch.bfloat16
    before = objective_terms(runner, tokens)
    runner.run()
    assert all(p.dtype == torch.float32 for p in runner.sae.parameters())
    assert objective_terms(runner, tokens)["kl"] < 0.5 * before["kl"]


def test_loss_keeps_small_terms_next_to_a_huge_local_mse(tmp_path: Path) -> None:
    from sae_lens.saes.sae import TrainStepOutput

    from sae_e2e_plugin.training.objectives import ObjectiveOutput, combine_terms

    runner = runner_for(tmp_path)
    mse, l1, kl = torch.tensor(3.0e6), torch.tensor(0.1234), torch.tensor(0.5678)
    output = TrainStepOutput(
        sae_in=torch.zeros(1),
        sae_out=torch.zeros(1),
        feature_acts=torch.zeros(1, 1),
        hidden_pre=torch.zeros(1),
        loss=mse + l1,
        losses={"mse_loss": mse, "l1_loss": l1},
    )
    terms = ObjectiveOutput(losses={"kl_loss": kl}, metrics={})
    combined = combine_terms(output, terms, runner.objective.local_mse_weight)
    assert combined.loss.item() == pytest.approx(0.1234 + 0.5678, rel=1e-6)
    assert set(combined.losses) == {"l1_loss", "kl_loss"}
    assert combined.metrics["local_mse"].item() == 3.0e6


def test_logged_terms_are_each_terms_float_read_in_one_transfer() -> None:
    from sae_lens.saes.sae import TrainStepOutput

    from sae_e2e_plugin.training.loop.training_log import logged_terms

    mse, l1 = torch.tensor(3.0e6), torch.tensor(0.1234, dtype=torch.float64)
    output = TrainStepOutput(
        sae_in=torch.zeros(1),
        sae_out=torch.zeros(1),
        feature_acts=torch.zeros(1, 1),
        hidden_pre=torch.zeros(1),
        loss=(mse + l1.float()).requires_grad_(True),
        losses={"mse_loss": mse, "l1_loss": l1},
    )
    terms = logged_terms(output)
    assert list(terms) == ["total_loss", "mse_loss", "l1_loss"]
    assert terms == {
        "total_loss": float(output.loss.detach()),
        "mse_loss": 3.0e6,
        "l1_loss": float(l1.float()),  # read in float32, as the loss itself
    }


_sigint_calls = itertools.count()


def _sigint_during_third_step(inputs: ObjectiveInputs) -> ObjectiveOutput:
    import os
    import signal

    if next(_sigint_calls) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C mid-step
    return ObjectiveOutput(losses={"recon": inputs.reconstruction.pow(2).mean()}, metrics={})


register_objective("test_sigint_during_third_step", _sigint_during_third_step, needs_full_run=False)


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    from sae_e2e_plugin.training.loop.sae_trainer import TrainingInterrupted

    dataset = token_dataset(n_rows=64, seed=11)
    common: dict[str, Any] = dict(training_tokens=6 * 4 * CONTEXT, n_eval_batches=0)
    interrupted = runner_for(
        tmp_path / "a", dataset=dataset, loss="test_sigint_during_third_step", **common
    )
    with pytest.raises(TrainingInterrupted):
        interrupted.run()
    assert interrupted.cfg.checkpoint_path is not None
    (checkpoint,) = [p for p in Path(interrupted.cfg.checkpoint_path).iterdir() if p.is_dir()]
    assert (
        int(checkpoint.name) == 3 * 4 * CONTEXT
    )  # the third step completed, the fourth never began

    resumed = runner_for(
        tmp_path / "b",
        dataset=dataset,
        loss="test_sigint_during_third_step",
        resume_from_checkpoint=str(checkpoint),
        **common,
    )
    resumed.run()
    # The call counter is past 2 now, so this run is not interrupted.
    uninterrupted = runner_for(
        tmp_path / "c", dataset=dataset, loss="test_sigint_during_third_step", **common
    )
    uninterrupted.run()
    for (name, a), (_, b) in zip(
        uninterrupted.sae.state_dict().items(), resumed.sae.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_a_single_sae_checkpoint_of_the_earlier_layout_resumes_to_the_same_weights(
    tmp_path: Path,
) -> None:
    # Before the one training stack a single SAE's e2e_trainer_state.json did not record the
    # tokens trained (SAETrainer's own state did), and the checkpoint files sat in its folder
    # as they still do: such a checkpoint resumes exactly.
    dataset = token_dataset(n_rows=64, seed=5)
    common: dict[str, Any] = dict(training_tokens=6 * 4 * CONTEXT, n_checkpoints=1)
    full = runner_for(tmp_path / "a", dataset=dataset, **common)
    full.run()
    assert full.cfg.checkpoint_path is not None
    (checkpoint,) = [p for p in Path(full.cfg.checkpoint_path).iterdir() if p.is_dir()]
    assert (checkpoint / "sae_weights.safetensors").is_file()  # the flat layout
    state_file = checkpoint / "e2e_trainer_state.json"
    state = json.loads(state_file.read_text())
    old = {k: state[k] for k in ("n_sequences_consumed", "n_steps_taken", "objective")}
    state_file.write_text(json.dumps(old | {"first_e2e_step": 0, "local_data": None}))

    resumed = runner_for(
        tmp_path / "b", dataset=dataset, resume_from_checkpoint=str(checkpoint), **common
    )
    resumed.run()
    assert resumed.trainer is not None
    assert resumed.trainer.n_training_samples == full.trainer.n_training_samples  # type: ignore[union-attr]
    for (name, a), (_, b) in zip(
        full.sae.state_dict().items(), resumed.sae.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
