"""The Hugging Face splice (``core.hf_splice``, ``core.hf_runs``) on tiny random transformers
models: every run checked against whole runs of the model with a plain forward hook."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_cfg
from einops import rearrange
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sae_e2e_plugin import evaluate_sae
from sae_e2e_plugin.core import model_splice
from sae_e2e_plugin.core.losses import chunked_kl_orig_to_patched, kl_orig_to_patched, mse_mean
from sae_e2e_plugin.training.objectives import resolve_objective

VOCAB = 40
D = 16
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=D,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)


def tiny(kind: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if kind == "llama":
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(**SIZES))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=3, n_head=2))
    elif kind == "qwen2-mixed":  # sliding and full attention layers: different masks
        types = ["full_attention", "sliding_attention", "full_attention"]
        config = Qwen2Config(**SIZES, layer_types=types, sliding_window=3, use_sliding_window=True)
        model = Qwen2ForCausalLM(config)
    else:  # Cohere scales its logits after lm_head: norm + lm_head is not its head
        model = CohereForCausalLM(CohereConfig(**SIZES, logit_scale=0.5))
    return model.eval()


def layer(kind: str, k: int) -> str:
    return f"transformer.h.{k}" if kind == "gpt2" else f"model.layers.{k}"


TOKENS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def whole_run(
    hf: PreTrainedModel, hook: str, replacement: torch.Tensor | None, record: tuple[str, ...] = ()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's own logits, ``hook``'s output replaced (if given) by a plain forward hook,
    and the outputs of the modules in ``record``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    if replacement is not None:

        def swap(module: Any, args: Any, out: Any) -> Any:
            return (replacement, *out[1:]) if isinstance(out, tuple) else replacement

        handles.append(hf.get_submodule(hook).register_forward_hook(swap))
    for name in record:

        def keep(module: Any, args: Any, out: Any, name: str = name) -> None:
            seen[name] = out[0] if isinstance(out, tuple) else out

        handles.append(hf.get_submodule(name).register_forward_hook(keep))
    try:
        logits = hf(TOKENS, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def runs(hf: PreTrainedModel, hook: str, downstream: Any = None) -> tuple[Any, Any, Any, Any]:
    plan = model_splice.plan_splice(hf, hook, downstream, d_in=D)
    with torch.no_grad():
        prefix = model_splice.run_prefix(hf, TOKENS, plan)
        clean = model_splice.run_clean(hf, prefix, plan)
    replacement = clean.acts + 0.5 * torch.randn(clean.acts.shape)
    patched = model_splice.run_patched(hf, prefix, plan, replacement.requires_grad_())
    return plan, clean, patched, replacement


@pytest.mark.parametrize(
    ("kind", "hook", "start"),
    [
        ("llama", "model.layers.1", 1),
        ("llama", "model.layers.1.mlp", 1),
        ("llama", "model.layers.0.self_attn", 0),  # (tensor, None): the tensor is spliced
        ("llama", "model.embed_tokens", None),  # outside the layers: two whole runs
        ("gpt2", "transformer.h.1", 1),
    ],
)
def test_clean_and_patched_runs_equal_whole_runs_of_the_model(
    kind: str, hook: str, start: int | None
) -> None:
    hf = tiny(kind)
    plan, clean, patched, replacement = runs(hf, hook)
    assert plan.start_layer == start
    assert plan.downstream_hooks[-1] == layer(kind, 2)
    head = model_splice.model_head(hf, plan)
    logits, seen = whole_run(hf, hook, None, (hook, *plan.downstream_hooks))
    torch.testing.assert_close(clean.acts, seen[hook], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head(clean.final_resid), logits, rtol=1e-5, atol=1e-5)
    for name in plan.downstream_hooks:
        torch.testing.assert_close(clean.downstream[name], seen[name], rtol=1e-5, atol=1e-6)
    logits, seen = whole_run(hf, hook, replacement.detach(), plan.downstream_hooks)
    torch.testing.assert_close(head(patched.final_resid), logits, rtol=1e-5, atol=1e-5)
    for name in plan.downstream_hooks:
        torch.testing.assert_close(patched.downstream[name], seen[name], rtol=1e-5, atol=1e-6)
    # Gradient reaches the replacement only through the continuation.
    (grad,) = torch.autograd.grad(patched.final_resid.sum(), replacement)
    assert float(grad.abs().sum()) > 0


def test_layers_with_different_masks_get_two_whole_runs(caplog: pytest.LogCaptureFixture) -> None:
    hf = tiny("qwen2-mixed")
    with caplog.at_level(logging.INFO, logger="sae_e2e_plugin"):
        plan, clean, patched, replacement = runs(hf, "model.layers.0")
    assert plan.start_layer is None
    assert "no shared prefix (the later layers mix attention types" in caplog.text
    logits, _ = whole_run(hf, "model.layers.0", replacement.detach())
    head = model_splice.model_head(hf, plan)
    torch.testing.assert_close(head(patched.final_resid), logits, rtol=1e-5, atol=1e-5)


def test_a_head_that_does_not_give_the_logits_falls_back_to_full_logits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hf = tiny("cohere")
    with caplog.at_level(logging.INFO, logger="sae_e2e_plugin"):
        plan, clean, patched, replacement = runs(hf, "model.layers.1")
    assert "KL of this model is computed from full logits" in caplog.text
    assert plan.head_path is None and plan.start_layer is None
    assert clean.final_resid is not None and clean.final_resid.shape == (2, 10, VOCAB)
    logits_orig, _ = whole_run(hf, "model.layers.1", None)
    logits_patched, _ = whole_run(hf, "model.layers.1", replacement.detach())
    rows = "batch pos vocab -> (batch pos) vocab"
    kl = chunked_kl_orig_to_patched(
        rearrange(clean.final_resid, rows),
        rearrange(patched.final_resid, rows),
        model_splice.model_head(hf, plan),
        7,
    )
    torch.testing.assert_close(kl, kl_orig_to_patched(logits_orig, logits_patched))


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_e2e_downstream_terms_equal_the_hand_written_formula(checkpoint_blocks: bool) -> None:
    hf = tiny("llama")
    fields = dict(kl_chunk_size=7, compile_kl=False, checkpoint_blocks=checkpoint_blocks)
    cfg = make_cfg(
        Path("unused"),
        loss="e2e_downstream",
        kl_coefficient=2.0,
        downstream_coefficient=0.5,
        **fields,
    )
    objective = resolve_objective(cfg)
    plan = model_splice.plan_splice(hf, "model.layers.0", None, d_in=D)
    prefix = model_splice.run_prefix(hf, TOKENS, plan)
    clean = model_splice.run_clean(hf, prefix, plan)
    replacement = (clean.acts * 0.8).requires_grad_()
    losses = objective(hf, prefix, plan, clean, replacement).losses
    (grad,) = torch.autograd.grad(sum(losses.values()), replacement)  # type: ignore[arg-type]
    # By hand: 2 · KL(full logits) + 0.5 / 2 · Σ_k MSE(layer k's output), k = 1, 2.
    later = ("model.layers.1", "model.layers.2")
    logits_orig, clean_out = whole_run(hf, "model.layers.0", None, later)
    leaf = replacement.detach().requires_grad_()
    logits_patched, patched_out = whole_run(hf, "model.layers.0", leaf, later)
    kl = kl_orig_to_patched(logits_orig.detach(), logits_patched)
    mses = [mse_mean(patched_out[k], clean_out[k].detach()) for k in later]
    expected = {"kl_loss": 2.0 * kl} | {
        f"downstream_mse_loss/{k}": 0.25 * m for k, m in zip(later, mses, strict=True)
    }
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-7)
    (expected_grad,) = torch.autograd.grad(sum(expected.values()), leaf)  # type: ignore[arg-type]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_evaluate_sae_on_a_hf_model_matches_whole_runs() -> None:
    hf = tiny("llama")
    torch.manual_seed(2)
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=32, apply_b_dec_to_input=False))
    result = evaluate_sae(sae, hf, TOKENS, hook_name="model.layers.1", downstream_hooks=())
    logits, seen = whole_run(hf, "model.layers.1", None, ("model.layers.1",))
    with torch.no_grad():
        spliced, _ = whole_run(hf, "model.layers.1", sae(seen["model.layers.1"]))
    targets = TOKENS[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets)
    assert result.ce_loss_clean == pytest.approx(float(ce.detach()), rel=1e-5)
    assert result.kl_orig_patched == pytest.approx(
        float(kl_orig_to_patched(logits, spliced).detach()), rel=1e-4
    )


def test_the_plan_probes_in_eval_mode_and_restores_the_models_mode() -> None:
    hf = tiny("gpt2").train()  # dropout 0.1: two runs in training mode differ
    plan = model_splice.plan_splice(hf, "transformer.h.1", None, d_in=D)
    assert plan.start_layer == 1 and plan.head_path == "lm_head"
    assert hf.training


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("hook", "message"),
    [
        ("model.layer.1", r"hook_name='model.layer.1' is not a module .*Did you mean 'model.layers.1'"),
        ("model.rotary_emb", r"hook_name='model.rotary_emb' outputs tuple\(tensor .*, tensor .*\).*cannot tell which element"),
        ("model.norm", r"hook_name='model.norm' runs after the last decoder layer \('model.layers.2'\)"),
        ("model.layers.1.mlp.up_proj", r"sae.d_in is 16, but the output of hook_name='model.layers.1.mlp.up_proj' has width 32"),
    ],
)  # fmt: skip
def test_hooks_the_splice_cannot_use_are_refused(hook: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_splice.plan_splice(tiny("llama"), hook, None, d_in=D)


def test_a_model_without_an_output_head_is_refused() -> None:
    torch.manual_seed(0)
    base = LlamaModel(LlamaConfig(**SIZES)).eval()  # hidden states out, no logits
    with pytest.raises(ValueError, match=r"this LlamaModel has no output head .* not a base model"):
        model_splice.plan_splice(base, "layers.1", None, d_in=D)


def test_a_downstream_hook_before_the_sae_is_refused() -> None:
    with pytest.raises(ValueError, match=r"downstream_hooks contains 'model.layers.0', which does"):
        model_splice.plan_splice(tiny("llama"), "model.layers.1", ["model.layers.0"], d_in=D)


def test_transformer_bridge_names_the_alternative() -> None:
    with pytest.raises(
        ValueError, match=r"TransformerBridge.*model_class_name='AutoModelForCausalLM'"
    ):
        make_cfg(Path("unused"), model_class_name="TransformerBridge")
    with pytest.raises(ValueError, match=r"model_class_name='HookedMamba' is not supported"):
        make_cfg(Path("unused"), model_class_name="HookedMamba")
    assert make_cfg(Path("unused"), model_class_name="AutoModelForCausalLM").loss == "e2e"
