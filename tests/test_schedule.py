"""``e2e_fraction`` (local steps on SAELens' activation buffer, then e2e steps) and
``kl_mse_balance="adaptive"`` on the tiny model: data consumed by each phase, the local step
against SAELens' own, the adaptive mix by hand, resume around the switch, every architecture."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer
from test_trainer import ARCHITECTURES

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.runs.data_streams import BufferedActivations, TokenBatches
from sae_e2e_plugin.training.loop.sae_trainer import E2ESAETrainer
from sae_e2e_plugin.training.loop.schedule import plan_schedule
from sae_e2e_plugin.training.loop.trainer import E2ETrainer
from sae_e2e_plugin.training.objectives import ObjectiveOutput, combine_terms

BATCH = 4 * CONTEXT  # tokens per step in make_cfg
STEPS = 10

# A buffer of two LLM batches: half of it is kept and mixed into the next batch, so a resume
# inside the local phase must rebuild rows drawn before the checkpoint.
COMMON: dict[str, Any] = dict(
    training_tokens=STEPS * BATCH,
    n_batches_in_buffer=8,
    n_eval_batches=1,
    eval_at_end=False,
    lr_scheduler_name="cosineannealing",
    lr_decay_steps=STEPS,
)


def runner_for(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    cfg = make_cfg(tmp_path, **(COMMON | overrides))
    return E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset(n_rows=100, seed=3)
    )


def weights(runner: E2ESAETrainingRunner) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in runner.sae.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    ("steps", "fraction", "first_e2e"),
    [(10, 1.0, 0), (10, 0.5, 5), (50, 0.1, 45), (20, 0.05, 19), (10, 0.25, 7), (10, 0.04, 10)],
)
def test_the_schedule_switches_at_a_whole_step(steps: int, fraction: float, first_e2e: int) -> None:
    schedule = plan_schedule(steps * BATCH, BATCH, fraction)
    assert schedule.first_e2e_step == first_e2e
    assert schedule.local_tokens + schedule.e2e_tokens == steps * BATCH
    assert [schedule.phase(s) for s in range(steps)] == ["local"] * first_e2e + ["e2e"] * (
        steps - first_e2e
    )


def test_the_log_line_names_the_objective_not_end_to_end_for_local_runs() -> None:
    whole = plan_schedule(10 * BATCH, BATCH, 1.0)
    assert whole.describe("local") == f"all 10 steps with loss='local' ({10 * BATCH} tokens)"
    split = plan_schedule(10 * BATCH, BATCH, 0.5).describe("e2e_downstream")
    assert split == (
        f"steps 0-4 local ({5 * BATCH} activations from the activation buffer), "
        f"steps 5-9 with loss='e2e_downstream' ({5 * BATCH} tokens)"
    )


def test_e2e_fraction_one_is_the_all_e2e_run(tmp_path: Path) -> None:
    # Checked once against the code before e2e_fraction existed (commit a2206ff): the same
    # weights bit for bit for e2e and e2e_downstream with checkpoints and a cosine schedule.
    default = runner_for(tmp_path / "a")
    default.run()
    explicit = runner_for(tmp_path / "b", e2e_fraction=1.0)
    explicit.run()
    assert_same_weights(weights(default), weights(explicit))
    assert explicit.trainer is not None and explicit.trainer.local_data is None
    assert isinstance(explicit.trainer.tokens, TokenBatches)


def test_half_schedule_reads_activations_then_tokens_in_exact_amounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, tuple[int, ...], torch.dtype, float]] = []
    original = E2ETrainer.step

    def spy(trainer: E2ETrainer, batch: torch.Tensor) -> dict[str, TrainStepOutput]:
        lr = trainer.trainers["sae"].optimizer.param_groups[0]["lr"]
        seen.append(
            (trainer.schedule.phase(trainer.n_steps_taken), tuple(batch.shape), batch.dtype, lr)
        )
        if batch.dtype == torch.long and len(seen) == 6:
            first_tokens.append(batch.clone())
        return original(trainer, batch)

    first_tokens: list[torch.Tensor] = []
    monkeypatch.setattr(E2ETrainer, "step", spy)
    runner = runner_for(tmp_path, e2e_fraction=0.5)
    runner.run()
    trainer = runner.trainer
    assert trainer is not None and isinstance(trainer.local_data, BufferedActivations)
    assert [s[:3] for s in seen] == [("local", (BATCH, D_MODEL), torch.float32)] * 5 + [
        ("e2e", (4, CONTEXT), torch.long)
    ] * 5
    assert trainer.local_data.batches == 5  # 5 × BATCH activations through the store's buffer
    assert trainer.n_sequences_consumed == 5 * 4  # 5 × BATCH tokens as whole sequences
    assert trainer.n_training_samples == STEPS * BATCH
    # The e2e phase reads the sequences right after the held-out ones and the buffer's.
    held_out = runner.cfg.n_eval_sequences
    start = held_out + trainer.local_data.sequences
    rows = torch.tensor(token_dataset(n_rows=100, seed=3)["tokens"][start : start + 4])
    assert torch.equal(first_tokens[0], rows)
    # One optimizer and one LR schedule across the switch.
    lrs = [s[3] for s in seen]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    optimizer = trainer.trainers["sae"].optimizer
    adam_steps = {int(state["step"]) for state in optimizer.state.values()}
    assert adam_steps == {STEPS}
    rows_logged = [json.loads(line) for line in (tmp_path / "output" / "training_log.jsonl").open()]
    assert [r["phase"] for r in rows_logged] == ["local"] * 5 + ["e2e"] * 5
    assert all(r["seconds"] > 0 for r in rows_logged)


def test_the_local_step_is_saelens_own_step(tmp_path: Path) -> None:
    runner = runner_for(tmp_path, e2e_fraction=0.5)
    activations = torch.randn(BATCH, D_MODEL) * 2
    theirs = SAETrainer(
        cfg=runner.cfg.to_sae_trainer_config(),
        sae=copy.deepcopy(runner.sae),
        data_provider=iter(()),
    )
    ours = E2ESAETrainer(runner.cfg.to_sae_trainer_config(), runner.sae)
    for _ in range(2):
        expected = theirs.step(activations)
        got = ours.local_step(activations, runner.cfg.train_batch_size_tokens)
        assert got.losses.keys() == expected.losses.keys()
        assert torch.equal(got.loss, expected.loss)
    assert_same_weights(
        {k: v.detach() for k, v in ours.sae.state_dict().items()},
        {k: v.detach() for k, v in theirs.sae.state_dict().items()},
    )


def test_the_adaptive_mix_is_half_of_alpha_kl_plus_mse() -> None:
    mse = torch.tensor(3.0, requires_grad=True)
    kl = torch.tensor(0.5, requires_grad=True)
    l1 = torch.tensor(0.25)
    output = TrainStepOutput(
        sae_in=torch.zeros(1),
        sae_out=torch.zeros(1),
        feature_acts=torch.zeros(1, 1),
        hidden_pre=torch.zeros(1),
        loss=mse + l1,
        losses={"mse_loss": mse, "l1_loss": l1},
    )
    terms = ObjectiveOutput(losses={"kl_loss": kl}, metrics={"kl_orig_patched": kl.detach()})
    combined = combine_terms(output, terms, local_mse_weight=0.0, balance="adaptive")
    alpha = 3.0 / 0.5
    assert combined.loss.item() == pytest.approx(0.5 * (alpha * 0.5 + 3.0) + 0.25)
    assert combined.losses["kl_loss"].item() == pytest.approx(0.5 * alpha * 0.5)
    assert combined.losses["mse_loss"].item() == pytest.approx(0.5 * 3.0)
    assert combined.metrics["kl_mse_alpha"].item() == pytest.approx(alpha)
    combined.loss.backward()
    # α is a constant: d/dKL = α/2, d/dMSE = 1/2.
    assert kl.grad is not None and kl.grad.item() == pytest.approx(alpha / 2)
    assert mse.grad is not None and mse.grad.item() == pytest.approx(0.5)


def test_an_adaptive_run_logs_equal_halves(tmp_path: Path) -> None:
    runner = runner_for(
        tmp_path, e2e_fraction=0.5, kl_mse_balance="adaptive", loss="e2e_downstream"
    )
    runner.run()
    rows = [json.loads(line) for line in (tmp_path / "output" / "training_log.jsonl").open()]
    for row in rows[5:]:
        assert row["kl_loss"] == pytest.approx(row["mse_loss"], rel=1e-5)
        not_terms = ("step", "tokens", "phase", "total_loss", "l0", "seconds")
        terms = [v for k, v in row.items() if k not in not_terms]
        assert row["total_loss"] == pytest.approx(sum(terms), rel=1e-5)


@pytest.mark.parametrize("resume_after_steps", [4, 5, 6], ids=["before", "at", "after"])
def test_resume_around_the_switch_ends_with_the_same_weights(
    tmp_path: Path, resume_after_steps: int
) -> None:
    schedule = dict(e2e_fraction=0.5, n_checkpoints=STEPS - 1)
    full = runner_for(tmp_path / "full", **schedule)
    full.run()
    # Checkpoints after each step from the second: <checkpoint_path>/<run id>/<tokens>.
    checkpoint = Path(full.cfg.checkpoint_path or "") / str(resume_after_steps * BATCH)
    state = json.loads((checkpoint / "e2e_trainer_state.json").read_text())
    assert state["next_phase"] == ("local" if resume_after_steps < 5 else "e2e")
    resumed = runner_for(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **schedule)
    resumed.run()
    assert resumed.trainer is not None and resumed.trainer.n_steps_taken == STEPS
    assert_same_weights(weights(full), weights(resumed))


def test_resume_with_another_e2e_fraction_is_refused(tmp_path: Path) -> None:
    full = runner_for(tmp_path / "full", e2e_fraction=0.5, n_checkpoints=1)
    full.run()
    (checkpoint,) = Path(full.cfg.checkpoint_path or "").iterdir()
    with pytest.raises(ValueError, match=r"e2e_fraction: 0.5 -> 0.3"):  # before it builds
        runner_for(tmp_path / "other", e2e_fraction=0.3, resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_trains_a_switching_schedule_and_exports(
    tmp_path: Path, architecture: str
) -> None:
    runner = runner_for(
        tmp_path,
        sae_cfg=ARCHITECTURES[architecture](),
        training_tokens=4 * BATCH,
        lr_decay_steps=0,
        lr_scheduler_name="constant",
        e2e_fraction=0.5,
        kl_mse_balance="adaptive",
    )
    runner.run()
    out = Path(runner.cfg.output_path or "")
    metadata = json.loads((out / "cfg.json").read_text())["metadata"]["e2e_objective"]
    assert metadata["e2e_fraction"] == 0.5 and metadata["kl_mse_balance"] == "adaptive"
    loaded = sae_lens.SAE.load_from_disk(str(out))
    assert loaded(torch.randn(5, D_MODEL)).shape == (5, D_MODEL)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(e2e_fraction=0.0), "e2e_fraction must be in \\(0, 1\\]"),
        (dict(e2e_fraction=1.5), "e2e_fraction must be in \\(0, 1\\]"),
        (dict(e2e_fraction=float("nan")), "e2e_fraction must be in"),
        (dict(e2e_fraction=0.05), "less than one training batch"),
        (dict(e2e_fraction=0.5, loss="local"), "e2e_fraction=0.5 with loss='local'"),
        (
            dict(kl_mse_balance="adaptive", loss="local"),
            "kl_mse_balance='adaptive' with loss='local'",
        ),
        (
            dict(kl_mse_balance="adaptive", local_mse_coefficient=0.5),
            "local_mse_coefficient=0.5",
        ),
        (dict(kl_mse_balance="balanced"), "kl_mse_balance='balanced'"),
    ],
)
def test_bad_schedule_settings_are_refused(
    tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        make_cfg(tmp_path, **(COMMON | overrides))


@pytest.mark.parametrize(
    ("positions", "rows_per_sequence"),
    [({"seqpos_slice": (1, None)}, CONTEXT - 1), ({"seqpos_slice": (2, 6)}, 4)],
)
def test_a_schedule_with_positions_trains_locally_on_the_selected_rows(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    positions: dict[str, Any],
    rows_per_sequence: int,
) -> None:
    # Regression: the store's buffer held n_batches_in_buffer × selected positions rows, fewer
    # than a batch of sequences × context_size rows, and SAELens raised "Buffer size must be
    # greater than or equal to batch size" at the first local step.
    shapes: list[tuple[int, ...]] = []
    original = E2ETrainer.step

    def spy(trainer: E2ETrainer, batch: torch.Tensor) -> dict[str, TrainStepOutput]:
        shapes.append(tuple(batch.shape))
        return original(trainer, batch)

    monkeypatch.setattr(E2ETrainer, "step", spy)
    runner = runner_for(tmp_path, e2e_fraction=0.5, n_batches_in_buffer=4, **positions)
    runner.run()
    trainer = runner.trainer
    assert trainer is not None
    # A local step trains on the rows an e2e step selects: 4 sequences × the selected positions.
    assert shapes == [(4 * rows_per_sequence, D_MODEL)] * 5 + [(4, CONTEXT)] * 5
    # The schedule still counts whole sequences' tokens: 10 steps of BATCH tokens.
    assert trainer.n_training_samples == STEPS * BATCH
