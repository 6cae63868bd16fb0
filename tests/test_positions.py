"""Training and evaluating on chosen positions: ``seqpos_slice`` and ``exclude_special_tokens``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from sae_lens import StandardTrainingSAEConfig

from sae_e2e_plugin import E2ESAETrainingRunner, evaluate_sae
from sae_e2e_plugin.core.losses import kl_orig_to_patched
from sae_e2e_plugin.core.model_splice import run_clean, run_patched
from sae_e2e_plugin.core.positions import PositionFilter, selected_positions
from sae_e2e_plugin.core.splice import logits_from_final_resid, run_prefix

NO_SPARSITY = StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64, l1_coefficient=0.0)


def runner(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    cfg = make_cfg(tmp_path, **({"n_eval_batches": 0} | overrides))
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def trainer_without_updates(run: E2ESAETrainingRunner) -> tuple[Any, dict[str, Any]]:
    """A trainer whose step records the reconstruction and the SAE's gradients, and steps nothing."""
    trainer = run.build_trainer()
    seen: dict[str, Any] = {}

    class Spy:
        """The run's objective, recording the reconstruction it is handed."""

        def __getattr__(self, name: str) -> Any:
            return getattr(run.objective, name)

        def __call__(
            self, model: Any, prefix: Any, plan: Any, clean: Any, recon: Any, timer: Any
        ) -> Any:
            seen.update(reconstruction=recon.detach().clone(), clean=clean.acts.clone())
            return run.objective(model, prefix, plan, clean, recon, timer)

    def record_gradients() -> None:
        # The step pass has run the backward pass; record its gradients, step nothing.
        seen["grads"] = {
            n: p.grad.clone() for n, p in run.sae.named_parameters() if p.grad is not None
        }
        trainer.trainers["sae"].optimizer.zero_grad()

    trainer.step_pass.objective = Spy()  # type: ignore[assignment]
    trainer.trainers["sae"]._apply_gradients = record_gradients
    return trainer, seen


def test_position_zero_keeps_its_clean_activation_and_gives_no_gradient(tmp_path: Path) -> None:
    run = runner(tmp_path, seqpos_slice=(1, None), sae_cfg=NO_SPARSITY)
    trainer, seen = trainer_without_updates(run)
    tokens = torch.tensor(token_dataset(n_rows=4, seed=9)["tokens"])
    trainer.step(tokens)
    assert torch.equal(seen["reconstruction"][:, 0], seen["clean"][:, 0])
    assert not torch.equal(seen["reconstruction"][:, 1:], seen["clean"][:, 1:])

    # By hand: the SAE on positions 1.. only, the clean activation at 0, KL over every position.
    model, sae = run.model, run.sae
    sae.zero_grad()
    prefix = run_prefix(model, tokens, run.plan.start_layer)
    clean = run_clean(model, prefix, run.plan.plans["sae"])
    rows = sae(clean.acts[:, 1:].reshape(-1, D_MODEL)).reshape(4, CONTEXT - 1, D_MODEL)
    patched = run_patched(
        model, prefix, run.plan.plans["sae"], torch.cat([clean.acts[:, :1], rows], dim=1)
    )
    assert clean.final_resid is not None
    kl = kl_orig_to_patched(
        logits_from_final_resid(model, clean.final_resid),
        logits_from_final_resid(model, patched.final_resid),
    )
    kl.backward()
    assert seen["grads"].keys() == {n for n, p in sae.named_parameters() if p.grad is not None}
    for name, param in sae.named_parameters():
        assert param.grad is not None
        torch.testing.assert_close(seen["grads"][name], param.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_excluded_token_ids_mask_exactly_their_positions(tmp_path: Path) -> None:
    tokens = torch.tensor([[3, 1, 3, 5], [0, 3, 3, 2]])
    mask = selected_positions(tokens, PositionFilter(excluded_ids=(3,)))
    assert mask.tolist() == [[False, True, False, True], [True, False, False, True]]
    sliced = selected_positions(tokens, PositionFilter(seqpos_slice=(1, None), excluded_ids=(3,)))
    assert sliced.tolist() == [[False, True, False, True], [False, False, False, True]]

    run = runner(tmp_path, exclude_special_tokens=[0, 1])
    assert run.positions.excluded_ids == (0, 1)
    trainer, _ = trainer_without_updates(run)
    rows: list[int] = []
    forward = run.sae.training_forward_pass

    def count(step_input: Any) -> Any:
        rows.append(step_input.sae_in.shape[0])
        return forward(step_input=step_input)

    run.sae.training_forward_pass = count  # type: ignore[method-assign]
    batch = torch.tensor(token_dataset(n_rows=4, seed=2)["tokens"])
    trainer.step(batch)
    assert rows == [int((batch > 1).sum())] and rows[0] < batch.numel()


def test_evaluation_on_a_slice_equals_a_hand_computation(tmp_path: Path) -> None:
    run = runner(tmp_path, seqpos_slice=(2, None))
    model, sae = run.model, run.sae
    tokens = torch.tensor(token_dataset(n_rows=3, seed=4)["tokens"])
    result = evaluate_sae(
        sae,
        model,
        tokens,
        hook_name=run.cfg.hook_name,
        downstream_hooks=(),
        positions=run.positions,
    )
    with torch.no_grad():
        prefix = run_prefix(model, tokens, run.plan.start_layer)
        clean = run_clean(model, prefix, run.plan.plans["sae"])
        chosen = clean.acts[:, 2:].reshape(-1, D_MODEL)
        features = sae.encode(chosen)
        recon = sae.decode(features)
        spliced = torch.cat([clean.acts[:, :2], recon.reshape(3, CONTEXT - 2, D_MODEL)], dim=1)
        patched = run_patched(model, prefix, run.plan.plans["sae"], spliced)
        assert clean.final_resid is not None
        kl = kl_orig_to_patched(
            logits_from_final_resid(model, clean.final_resid),
            logits_from_final_resid(model, patched.final_resid),
        )
        spread = (chosen - chosen.mean(0)).pow(2).sum(-1)
        ev = (1 - (recon - chosen).pow(2).sum(-1) / spread).mean()
        # The baseline zeroes what the SAE replaces: positions 0 and 1 stay clean.
        zeroed = torch.cat([clean.acts[:, :2], torch.zeros_like(clean.acts[:, 2:])], dim=1)
        ablated = run_patched(model, prefix, run.plan.plans["sae"], zeroed)
        ablated_logits = logits_from_final_resid(model, ablated.final_resid)
        ce_ablated = F.cross_entropy(
            ablated_logits[:, :-1].reshape(-1, ablated_logits.shape[-1]).float(),
            tokens[:, 1:].reshape(-1),
        )
    assert result.ce_loss_zero_ablation == pytest.approx(float(ce_ablated), rel=1e-4)
    assert result.n_tokens == 3 * CONTEXT and result.n_spliced == 3 * (CONTEXT - 2)
    assert result.l0 == pytest.approx(float((features != 0).sum(-1).float().mean()), rel=1e-6)
    assert result.kl_orig_patched == pytest.approx(float(kl), rel=1e-4)
    assert result.explained_variance == pytest.approx(float(ev), rel=1e-4)
    assert "spliced at 18 of the tokens" in result.format_table()


def test_a_slice_or_exclusion_that_selects_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"slice \(8, None\) results in an empty range"):
        make_cfg(tmp_path, seqpos_slice=(CONTEXT, None))
    run = runner(tmp_path, exclude_special_tokens=list(range(40)))  # every id of the vocabulary
    trainer, _ = trainer_without_updates(run)
    with pytest.raises(ValueError, match="no position of this batch is selected"):
        trainer.step(torch.tensor(token_dataset(n_rows=4)["tokens"]))


def test_the_export_records_the_positions_and_training_runs(tmp_path: Path) -> None:
    run = runner(
        tmp_path,
        seqpos_slice=(1, None),
        exclude_special_tokens=[0],
        n_eval_batches=1,
        eval_batch_size_prompts=2,
    )
    run.run()
    meta = run.sae.cfg.metadata
    assert meta.e2e_objective["seqpos_slice"] == [1, None]
    assert meta.e2e_objective["excluded_token_ids"] == [0]
    assert run.eval_history[-1][2].n_spliced < run.eval_history[-1][2].n_tokens
