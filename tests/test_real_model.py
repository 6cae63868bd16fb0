"""Integration tests on the bundled real model (SmolLM2-135M) and real text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from datasets import Dataset
from sae_lens import LoggingConfig

from sae_e2e_plugin import (
    E2ERunnerConfig,
    E2ESAETrainingRunner,
    load_builtin_dataset,
    load_builtin_model,
)
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.core.losses import kl_orig_to_patched
from sae_e2e_plugin.core.splice import (
    logits_from_final_resid,
    plan_splice,
    run_clean,
    run_patched,
    run_prefix,
)

pytest.importorskip("gguf", reason="the bundled model needs the [demo] extra")
HOOK = "blocks.15.hook_resid_pre"
CONTEXT = 64


@pytest.fixture(scope="module")
def model() -> Any:
    # float32: on CPUs without AVX-512-BF16/AMX, bf16 matrix products are emulated and these
    # tests took 20 minutes instead of seconds (bf16 training is tested on the tiny model).
    return load_builtin_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="module")
def fixed_batch(model: Any) -> Dataset:
    rows = load_builtin_dataset("shakespeare", model.tokenizer, CONTEXT)
    return Dataset.from_dict({"tokens": rows["tokens"][1000:1004]})


@torch.no_grad()
def kl_of(model: Any, sae: Any, tokens: torch.Tensor) -> float:
    plan = plan_splice(model, HOOK, ())
    prefix = run_prefix(model, tokens, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    recon = sae(clean.acts.float().reshape(-1, 576)).reshape(clean.acts.shape)
    patched = run_patched(model, prefix, plan, recon)
    return kl_orig_to_patched(
        logits_from_final_resid(model, clean.final_resid),
        logits_from_final_resid(model, patched.final_resid),
    ).item()


def test_a_few_e2e_steps_on_the_real_model_reduce_kl(
    model: Any, fixed_batch: Dataset, tmp_path: Path
) -> None:
    tokens = torch.tensor(fixed_batch["tokens"])
    cfg = E2ERunnerConfig(
        sae=sae_lens.StandardTrainingSAEConfig(
            d_in=576, d_sae=1152, l1_coefficient=1e-4, apply_b_dec_to_input=False
        ),
        model_name="smollm2-135m",
        hook_name=HOOK,
        dataset_path="in-memory",
        context_size=CONTEXT,
        prepend_bos=False,
        train_batch_size_tokens=4 * CONTEXT,
        training_tokens=8 * 4 * CONTEXT,
        store_batch_size_prompts=4,
        n_batches_in_buffer=4,
        lr=2e-3,
        loss="e2e",
        n_eval_batches=0,
        checkpoint_path=None,
        output_path=str(tmp_path / "out"),
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    runner = E2ESAETrainingRunner(cfg, override_model=model, override_dataset=fixed_batch)
    before = kl_of(model, runner.sae, tokens)
    runner.run()
    after = kl_of(model, runner.sae, tokens)
    assert before > 1.0  # a random SAE wrecks the model's predictions
    assert after < 0.6 * before, (before, after)


def test_cli_eval_on_an_exported_sae(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = sae_lens.StandardSAE(
        sae_lens.StandardSAEConfig(
            d_in=576,
            d_sae=1152,
            apply_b_dec_to_input=False,
            metadata=sae_lens.saes.sae.SAEMetadata(hook_name=HOOK, model_name="smollm2-135m"),
        )
    )
    sae.save_model(tmp_path / "sae")
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(tmp_path / "sae"),
            "--dataset_path",
            "pydoc-topics",
            "--context_size",
            "32",
            "--n_sequences",
            "4",
            "--batch_size",
            "2",
            "--lm_dtype",
            "float32",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_tokens"] == 4 * 32 and result["hook_name"] == HOOK
    assert result["ce_loss_spliced"] > result["ce_loss_clean"] > 0
    assert "CE loss increase" in capsys.readouterr().out
