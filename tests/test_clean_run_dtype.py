"""``clean_run_dtype``: the clean run's targets-only part (the blocks after the latest SAE's
block, and the clean head) under autocast; the SAEs' inputs and everything else unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, make_cfg, tiny_model, token_dataset
from test_hf_splice import TOKENS, tiny

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.core import model_splice
from sae_e2e_plugin.core.losses import chunked_kl_orig_to_patched, kl_orig_to_patched
from sae_e2e_plugin.core.multi_splice import MultiSplicePlan

BF16 = torch.bfloat16


def clean_runs(model: Any, hook: str, tokens: torch.Tensor) -> tuple[Any, Any, Any]:
    plan = MultiSplicePlan.of_one("sae", model_splice.plan_splice(model, hook, None))
    prefix = model_splice.run_prefix(model, tokens, plan)
    exact = model_splice.run_clean_multi(model, prefix, plan)
    lowered = model_splice.run_clean_multi(model, prefix, plan, autocast=BF16)
    return plan, exact, lowered


def test_a_hooked_transformer_runs_only_the_blocks_after_the_sae_under_autocast() -> None:
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    _, exact, lowered = clean_runs(model, "blocks.0.hook_resid_post", tokens)
    # The SAE's input comes from its own block, which stays in float32.
    assert torch.equal(
        lowered.acts["blocks.0.hook_resid_post"], exact.acts["blocks.0.hook_resid_post"]
    )
    # By hand: block 0 in float32, blocks 1 and 2 under bf16 autocast.
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=1)
        with torch.autocast("cpu", dtype=BF16):
            for block in model.blocks[1:]:
                resid = block(resid)
    assert torch.equal(lowered.final_resid, resid)
    assert not torch.equal(lowered.final_resid, exact.final_resid)
    assert torch.allclose(lowered.final_resid, exact.final_resid, rtol=0.05, atol=0.05)


def test_a_hf_model_runs_only_the_layers_after_the_sae_under_autocast() -> None:
    hf = tiny("llama")
    _, exact, lowered = clean_runs(hf, "model.layers.0", TOKENS)
    assert torch.equal(lowered.acts["model.layers.0"], exact.acts["model.layers.0"])
    # By hand: the whole model in float32 up to layer 0's output, then layers 1 and 2 under
    # bf16 autocast (the same rotary embeddings and causal mask as the model's own forward).
    captured: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        handle = hf.model.layers[0].register_forward_hook(
            lambda module, args, output: captured.setdefault("h", output)
        )
        hf(TOKENS)
        handle.remove()
        hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
        positions = torch.arange(TOKENS.shape[1]).unsqueeze(0)
        rotary = hf.model.rotary_emb(hidden, positions)
        with torch.autocast("cpu", dtype=BF16):
            for layer in hf.model.layers[1:]:
                out = layer(hidden, position_embeddings=rotary, position_ids=positions)
                hidden = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(lowered.final_resid, hidden, rtol=1e-3, atol=1e-3)
    assert not torch.equal(lowered.final_resid, exact.final_resid)
    assert torch.allclose(lowered.final_resid, exact.final_resid, rtol=0.05, atol=0.05)


def test_the_clean_head_at_lower_precision_is_the_kl_of_its_own_logits() -> None:
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    orig = torch.randn(12, 16, generator=gen)
    patched = torch.randn(12, 16, generator=gen, requires_grad=True)
    plan = model_splice.plan_splice(model, "blocks.0.hook_resid_post", None)
    head = model_splice.model_head(model, plan)
    low_head = model_splice.model_head(model, plan, autocast=BF16)
    assert low_head(orig).dtype == BF16
    want = kl_orig_to_patched(low_head(orig).float(), head(patched))
    (want_grad,) = torch.autograd.grad(want, patched)
    got = chunked_kl_orig_to_patched(orig, patched, head, 5, orig_to_logits=low_head)
    (got_grad,) = torch.autograd.grad(got, patched)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # the evaluation's path (no gradient) reads the same head
        assert torch.allclose(
            chunked_kl_orig_to_patched(orig, patched, head, 5, orig_to_logits=low_head), want
        )
    exact = chunked_kl_orig_to_patched(orig, patched.detach(), head, 5)
    assert not torch.allclose(exact, want, rtol=1e-6, atol=0)


def one_step(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = make_cfg(tmp_path, hook_name="blocks.0.hook_resid_post", loss="e2e", **overrides)
    runner = E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )
    trainer = runner.build_trainer()
    tokens = torch.tensor(token_dataset()["tokens"][:4])
    (output,) = trainer.step_pass.run(tokens, trainer.trainers).values()  # gradients, no update
    (inner,) = trainer.trainers.values()
    grads = torch.cat([p.grad.flatten() for p in inner.sae.parameters() if p.grad is not None])
    kl = output.metrics["kl_orig_patched"]
    assert isinstance(kl, torch.Tensor)
    return {"kl": kl.item(), "grad": grads}


def test_a_training_step_with_the_clean_run_in_bf16_is_close_to_the_exact_one(
    tmp_path: Path,
) -> None:
    exact = one_step(tmp_path / "exact")
    lowered = one_step(tmp_path / "bf16", clean_run_dtype="bfloat16")
    assert lowered["kl"] != exact["kl"]
    assert lowered["kl"] == pytest.approx(exact["kl"], rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(lowered["grad"], exact["grad"], dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"clean_run_dtype": "int8"}, ["clean_run_dtype='int8'", "'bfloat16'"]),
        ({"clean_run_dtype": "float32"}, ["clean_run_dtype='float32'", "'bfloat16'"]),
        ({"clean_run_dtype": "bfloat16", "loss": "local"}, ["loss='local'", "unset"]),
        ({"clean_run_dtype": "float16"}, ["clean_run_dtype='float16'", "CPU", "'bfloat16'"]),
    ],
)
def test_a_clean_run_dtype_that_cannot_apply_is_refused_by_name(
    tmp_path: Path, overrides: dict[str, Any], words: list[str]
) -> None:
    fields = {"loss": "e2e"} | overrides
    with pytest.raises(ValueError) as error:
        make_cfg(tmp_path, **fields)
    for word in words:
        assert word in str(error.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("splice", ["joint", "independent"])
def test_several_saes_lower_only_the_blocks_after_the_latest_sae(
    tmp_path: Path, splice: str
) -> None:
    from test_multi_sae import multi_runner, sae_cfg

    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.1.hook_resid_post"}
    results = []
    for dtype in (None, "bfloat16"):
        runner = multi_runner(
            tmp_path / str(dtype), {"a": sae_cfg(), "b": sae_cfg()}, hooks, splice,
            clean_run_dtype=dtype,
        )  # fmt: skip
        trainer = runner.build_trainer()
        tokens = torch.tensor(token_dataset()["tokens"][:4])
        outputs = trainer.step_pass.run(tokens, trainer.trainers)
        kls = {name: out.metrics["kl_orig_patched"] for name, out in outputs.items()}
        grads = {
            name: torch.cat([p.grad.flatten() for p in t.sae.parameters() if p.grad is not None])
            for name, t in trainer.trainers.items()
        }
        results.append((kls, grads))
    (exact_kl, exact_grad), (low_kl, low_grad) = results
    for name in hooks:
        assert not torch.equal(low_kl[name], exact_kl[name])
        assert torch.allclose(low_kl[name], exact_kl[name], rtol=0.05)
        cosine = torch.nn.functional.cosine_similarity(low_grad[name], exact_grad[name], dim=0)
        assert cosine > 0.99, name


def test_bf16_settings_on_a_cpu_that_emulates_bf16_are_warned_about_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sae_e2e_plugin.runs.run_setup import check_precisions

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    cfg = make_cfg(tmp_path, clean_run_dtype="bfloat16")
    with caplog.at_level("WARNING", logger="sae_e2e_plugin"):
        check_precisions(cfg, None)
    assert "clean_run_dtype='bfloat16' on a CPU without AVX-512-BF16" in caplog.text
    assert "Leave clean_run_dtype unset" in caplog.text and "lm_dtype=" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sae_e2e_plugin"):
        check_precisions(make_cfg(tmp_path), "bfloat16")
    assert "lm_dtype='bfloat16' on a CPU" in caplog.text and "clean_run_dtype" not in caplog.text


def test_bf16_targets_on_a_gpu_without_bf16_are_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_e2e_plugin.runs.run_setup import check_precisions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    cfg = make_cfg(tmp_path, clean_run_dtype="bfloat16")
    cfg.llm_device = "cuda:0"  # what the run would hold the model on
    with pytest.raises(ValueError, match=r"clean_run_dtype='bfloat16'.*'cuda:0'.*'float16'"):
        check_precisions(cfg, None)
    exact = make_cfg(tmp_path)
    exact.llm_device = "cuda:0"
    check_precisions(exact, None)  # nothing lowered on that GPU: nothing refused
