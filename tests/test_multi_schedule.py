"""Several SAEs per run with a schedule (``e2e_fraction < 1``): local steps on SAELens'
multi-hook activation buffer, each SAE moved by SAELens' own step, then e2e steps."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONTEXT, D_MODEL, token_dataset
from sae_lens.training.sae_trainer import SAETrainer
from test_multi_sae import multi_runner, sae_cfg

from sae_e2e_plugin.training.loop.trainer import E2ETrainer

HOOKS = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
STEPS = 8
BATCH = 4 * CONTEXT


def runner_for(folder: Path, splice: str = "joint", **fields: Any) -> Any:
    defaults: dict[str, Any] = dict(
        training_tokens=STEPS * BATCH,
        e2e_fraction=0.5,
        n_batches_in_buffer=8,
        n_eval_batches=0,
        dataset=token_dataset(n_rows=100, seed=3),
    )
    return multi_runner(
        folder, {"a": sae_cfg(), "b": sae_cfg()}, HOOKS, splice, **(defaults | fields)
    )


def test_the_local_phase_moves_each_sae_by_saelens_own_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    original = E2ETrainer.step

    def spy(trainer: E2ETrainer, batch: Any) -> Any:
        seen.append(copy.deepcopy(batch) if isinstance(batch, dict) else batch.clone())
        if len(seen) == 1:  # each SAE's state before the first local step
            # SAELens' plain trainer of a copy of each SAE, as it stands before the step.
            before.update(
                {
                    n: SAETrainer(cfg=t.cfg, sae=copy.deepcopy(t.sae), data_provider=iter(()))
                    for n, t in trainer.trainers.items()
                }
            )
        out = original(trainer, batch)
        if len(seen) == 1:
            after.update(
                {n: copy.deepcopy(t.sae.state_dict()) for n, t in trainer.trainers.items()}
            )
        return out

    before: dict[str, SAETrainer[Any, Any]] = {}
    after: dict[str, dict[str, torch.Tensor]] = {}
    monkeypatch.setattr(E2ETrainer, "step", spy)
    # SAELens' own step, bit for bit, includes its optimizer's kernel (not torch's fused one).
    runner = runner_for(tmp_path, fused_adam=False)
    runner.run()
    trainer = runner.trainer
    # 4 local steps on {hook: [sequences × positions, d_in]}, then 4 e2e steps on tokens.
    assert [type(b).__name__ for b in seen] == ["dict"] * 4 + ["Tensor"] * 4
    assert all(set(b) == set(HOOKS.values()) for b in seen[:4])
    assert all(v.shape == (BATCH, D_MODEL) for b in seen[:4] for v in b.values())
    assert [tuple(b.shape) for b in seen[4:]] == [(4, CONTEXT)] * 4
    assert trainer.n_training_samples == STEPS * BATCH and trainer.local_data.batches == 4
    # The first local step is SAELens' own step of each SAE on its hook's rows.
    for name, hook in HOOKS.items():
        theirs = before[name]
        theirs.step(seen[0][hook])
        for key, value in theirs.sae.state_dict().items():
            assert torch.equal(after[name][key], value), (name, key)
    rows = [json.loads(line) for line in (tmp_path / "output" / "training_log.jsonl").open()]
    assert [r["phase"] for r in rows] == ["local"] * 4 + ["e2e"] * 4


@pytest.mark.parametrize("splice", ["joint", "independent"])
@pytest.mark.parametrize("resume_after_steps", [3, 5])
def test_resume_around_the_switch_ends_with_the_same_saes(
    tmp_path: Path, splice: str, resume_after_steps: int
) -> None:
    schedule = dict(
        n_checkpoints=STEPS - 1, kl_mse_balance="adaptive" if splice == "independent" else "fixed"
    )
    full = runner_for(tmp_path / "full", splice, **schedule)
    full.run()
    checkpoint = Path(full.cfg.checkpoint_path) / str(resume_after_steps * BATCH)
    resumed = runner_for(
        tmp_path / "resumed", splice, resume_from_checkpoint=str(checkpoint), **schedule
    )
    resumed.run()
    for name in HOOKS:
        for key, value in full.saes[name].state_dict().items():
            assert torch.equal(resumed.saes[name].state_dict()[key], value), (name, key)


def test_a_schedule_with_positions_trains_several_saes_on_the_selected_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes: list[Any] = []
    original = E2ETrainer.step

    def spy(trainer: E2ETrainer, batch: Any) -> Any:
        shapes.append(
            {h: tuple(v.shape) for h, v in batch.items()} if isinstance(batch, dict) else None
        )
        return original(trainer, batch)

    monkeypatch.setattr(E2ETrainer, "step", spy)
    runner_for(tmp_path, "independent", seqpos_slice=(1, None), n_batches_in_buffer=4).run()
    rows = 4 * (CONTEXT - 1)
    assert shapes[:4] == [{h: (rows, D_MODEL) for h in HOOKS.values()}] * 4


def test_resume_with_another_schedule_is_refused(tmp_path: Path) -> None:
    full = runner_for(tmp_path / "full", n_checkpoints=1)
    full.run()
    (checkpoint,) = [
        p for p in Path(full.cfg.checkpoint_path).iterdir() if not p.name.startswith(".")
    ]
    # The checkpoint's config names the changed field before anything runs.
    with pytest.raises(ValueError, match=r"e2e_fraction: 0.5 -> 0.25"):
        runner_for(tmp_path / "other", e2e_fraction=0.25, resume_from_checkpoint=str(checkpoint))
    # Without that record, the checkpoint's own schedule refuses it.
    (checkpoint / "runner_cfg.json").unlink()
    other = runner_for(
        tmp_path / "again", e2e_fraction=0.25, resume_from_checkpoint=str(checkpoint)
    )
    with pytest.raises(ValueError, match="first e2e step|first end-to-end step"):
        other.run()
