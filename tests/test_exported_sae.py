"""The final evaluation and the export's metadata describe the SAE written to disk.

SAELens exports a batchtopk SAE as a JumpReLU SAE, which fires more features per token than
the k its training SAE keeps; eval.json and cfg.json must report the file's L0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import E2ESAETrainingRunner, evaluate_sae

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*model_from_pretrained_kwargs:UserWarning")

HOOK = "blocks.1.hook_resid_pre"
K = 4
ARCHITECTURES: dict[str, Any] = {
    "standard": lambda: sae_lens.StandardTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3
    ),
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=K),
    "matryoshka_batchtopk": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, k=K, matryoshka_widths=[8, 32]
    ),
}


def trained(tmp_path: Path, architecture: str, **overrides: Any) -> E2ESAETrainingRunner:
    cfg = make_cfg(
        tmp_path,
        sae_cfg=ARCHITECTURES[architecture](),
        training_tokens=3 * 4 * CONTEXT,
        n_eval_batches=2,
        eval_batch_size_prompts=3,
        **overrides,
    )
    runner = E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )
    runner.run()
    return runner


@torch.no_grad()
def counted_l0(sae: sae_lens.SAE[Any], runner: E2ESAETrainingRunner) -> float:
    """Mean number of non-zero ``encode`` outputs per held-out token, counted here."""
    assert runner.eval_tokens is not None
    _, cache = runner.model.run_with_cache(runner.eval_tokens, names_filter=HOOK)
    return float((sae.encode(cache[HOOK]) != 0).sum(-1).float().mean())


def evaluate(sae: sae_lens.SAE[Any], runner: E2ESAETrainingRunner) -> dict[str, Any]:
    assert runner.eval_tokens is not None
    result = evaluate_sae(sae, runner.model, runner.eval_tokens.split(3), hook_name=HOOK)
    return result.to_dict()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_eval_json_and_metadata_report_the_exported_sae(tmp_path: Path, architecture: str) -> None:
    runner = trained(tmp_path, architecture)
    out = Path(runner.cfg.output_path or "")
    saved = json.loads((out / "eval.json").read_text())
    metadata = json.loads((out / "cfg.json").read_text())["metadata"]
    exported = sae_lens.SAE.load_from_disk(str(out))  # plain SAELens, as a user loads it

    assert saved["l0"] == pytest.approx(counted_l0(exported, runner), rel=1e-6)
    assert saved["l0"] == pytest.approx(evaluate(exported, runner)["l0"], rel=1e-6)
    assert metadata["l0"] == saved["l0"]
    training_sae = evaluate(runner.sae, runner)
    if architecture != "standard":
        assert exported.cfg.architecture() == "jumprelu"
        assert training_sae["l0"] == pytest.approx(K)  # the batch top-k keeps k per token
        assert saved["l0"] > K  # the exported threshold lets more through on this run
    else:
        # Nothing changed for an SAE whose export is the same function.
        assert saved.pop("hook_name") == training_sae.pop("hook_name")
        assert saved == pytest.approx(training_sae, rel=1e-5, abs=1e-7)


def test_without_output_path_the_inference_sae_is_still_what_is_evaluated(
    tmp_path: Path,
) -> None:
    runner = trained(tmp_path, "batchtopk", output_path=None)
    assert not (tmp_path / "output").exists()
    _, _, final = runner.eval_history[-1]
    runner.sae.save_inference_model(tmp_path / "by_hand")
    exported = sae_lens.SAE.load_from_disk(str(tmp_path / "by_hand"))
    assert final.l0 == pytest.approx(counted_l0(exported, runner), rel=1e-6)
    assert final.l0 > K


def test_periodic_evaluations_still_evaluate_the_training_sae(tmp_path: Path) -> None:
    runner = trained(tmp_path, "batchtopk", eval_every_n_steps=1)
    steps = [step for step, _, _ in runner.eval_history]
    assert steps == [1, 2, 3, 3]
    # During training the batch top-k training SAE is evaluated (k per token), at the end the file.
    assert all(result.l0 == pytest.approx(K) for _, _, result in runner.eval_history[:-1])
    assert runner.eval_history[-1][2].l0 > K
