"""``core.lean_layers``: decoder layers that keep less for the backward pass change no number.

Each test runs tiny random Llama layers with and without it: outputs and input gradients must be
equal bit for bit, the bytes kept for the backward pass must drop by exactly a count made by
hand, and hooks, other wrappers and unknown classes must be left as they were."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_cfg
from transformers import LlamaConfig, LlamaForCausalLM

from sae_e2e_plugin.core import hf_runs, model_splice
from sae_e2e_plugin.core.lean_layers import lean_layers
from sae_e2e_plugin.training.objectives import resolve_objective

D, INTERMEDIATE, LAYERS, BATCH, POS = 16, 40, 4, 2, 10
TOKENS = torch.randint(0, 50, (BATCH, POS), generator=torch.Generator().manual_seed(3))


def tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=D,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def layer_inputs(model: LlamaForCausalLM) -> tuple[torch.Tensor, dict[str, Any]]:
    """The hidden state entering layer 0 and the keyword arguments every layer gets."""
    seen: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(TOKENS)
    handle.remove()
    return seen["hidden"], seen["kwargs"]


def run_layers(model: LlamaForCausalLM, lean: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every layer on the same input with grad: output, input gradient, bytes kept for backward."""
    hidden, kwargs = layer_inputs(model)
    kept: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            kept[(t.untyped_storage().data_ptr(), t.storage_offset())] = (
                t.numel() * t.element_size()
            )
        return t

    x = hidden.detach().clone().requires_grad_(True)
    layers = list(model.model.layers)
    block: AbstractContextManager[None] = lean_layers(layers) if lean else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), block:
        out = x
        for layer in layers:
            result = layer(out, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    (grad,) = torch.autograd.grad(out, x, weights)
    return out.detach(), grad, sum(kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layers_change_no_number_and_keep_the_counted_bytes_fewer(
    dtype: torch.dtype,
) -> None:
    model = tiny_llama(dtype)
    out, grad, kept = run_layers(model, lean=False)
    lean_out, lean_grad, lean_kept = run_layers(model, lean=True)
    assert torch.equal(out, lean_out) and torch.equal(grad, lean_grad)
    tokens, size = BATCH * POS, torch.finfo(dtype).bits // 8
    # Per layer, by hand: the gated MLP no longer keeps act(gate(x)) ([tokens, intermediate]
    # in the model's dtype). A bf16 norm keeps its input (size bytes × D) instead of the float32
    # copy (4 × D) and 1/rms (4 bytes a token); a float32 norm is not touched.
    saved_by_mlp = tokens * INTERMEDIATE * size
    saved_by_norms = 0 if dtype == torch.float32 else 2 * tokens * (4 * D + 4 - size * D)
    assert kept - lean_kept == LAYERS * (saved_by_mlp + saved_by_norms)


def test_forwards_are_restored_after_the_block_even_when_it_raises() -> None:
    model = tiny_llama(torch.float32)
    layer = model.model.layers[1]
    with contextlib.suppress(RuntimeError), lean_layers([layer]):
        assert "forward" in vars(layer.mlp)
        raise RuntimeError("a run that fails")
    assert not any("forward" in vars(m) for m in model.modules())


def test_hooks_run_once_and_a_hooked_activation_leaves_its_mlp_alone() -> None:
    model = tiny_llama(torch.float32)
    calls: dict[str, int] = {"mlp": 0, "act_fn": 0}

    def count(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            return output * 0.5  # a hook that changes the output, as a splice does

        return hook

    model.model.layers[0].mlp.register_forward_hook(count("mlp"))
    model.model.layers[1].mlp.act_fn.register_forward_hook(count("act_fn"))
    out, grad, _ = run_layers(model, lean=False)
    assert calls == {"mlp": 2, "act_fn": 2}  # two model runs: the inputs' and the layers'
    with lean_layers(list(model.model.layers)):
        assert "forward" in vars(model.model.layers[0].mlp)  # a hook on the MLP itself is fine
        assert "forward" not in vars(model.model.layers[1].mlp)  # its act_fn would run twice
    lean_out, lean_grad, _ = run_layers(model, lean=True)
    assert calls == {"mlp": 4, "act_fn": 4}  # the backward pass ran no hook
    assert torch.equal(out, lean_out) and torch.equal(grad, lean_grad)
    # A global module hook would fire on every activation function's recomputation.
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        with lean_layers(list(model.model.layers)):
            assert not any("forward" in vars(layer.mlp) for layer in model.model.layers)
    finally:
        handle.remove()


def test_other_wrappers_and_unknown_mlp_classes_are_left_alone() -> None:
    model = tiny_llama(torch.float32)
    wrapped, unknown = model.model.layers[0].mlp, model.model.layers[1].mlp
    original = wrapped.forward

    def wrapper(x: torch.Tensor) -> torch.Tensor:  # e.g. accelerate's offloading wrapper
        return original(x)

    wrapped.forward = wrapper
    unknown.__class__ = type("MyGatedMLP", (type(unknown),), {})
    # A model's own code (trust_remote_code) may name a class LlamaMLP and compute something else.
    same_name = model.model.layers[3].mlp
    same_name.__class__ = type(
        "LlamaMLP", (type(same_name),), {"__module__": "transformers_modules.x"}
    )
    with lean_layers(list(model.model.layers)):
        assert wrapped.forward is wrapper and "forward" not in vars(unknown)
        assert "forward" not in vars(same_name)
        assert "forward" in vars(model.model.layers[2].mlp)  # the known class next to them
    assert wrapped.forward is wrapper and "forward" not in vars(model.model.layers[2].mlp)


def test_a_norm_from_remote_code_is_left_alone() -> None:
    model = tiny_llama(torch.bfloat16)
    remote, own = model.model.layers[0], model.model.layers[1]
    norm = remote.input_layernorm
    norm.__class__ = type(
        type(norm).__name__, (type(norm),), {"__module__": "transformers_modules.x"}
    )
    with lean_layers([remote, own]):
        assert "forward" not in vars(norm) and "forward" in vars(remote.post_attention_layernorm)
        assert "forward" in vars(own.input_layernorm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_e2e_objective_gives_the_same_loss_and_gradient_with_and_without_lean_layers(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama(dtype)
    cfg = make_cfg(Path("unused"), loss="e2e_downstream", downstream_coefficient=0.5)
    objective = resolve_objective(cfg)
    plan = model_splice.plan_splice(model, "model.layers.0", None, d_in=D)
    prefix = model_splice.run_prefix(model, TOKENS, plan)
    clean = model_splice.run_clean(model, prefix, plan)

    def loss_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        replacement = (clean.acts * 0.8).detach().requires_grad_()
        losses = objective(model, prefix, plan, clean, replacement).losses
        total = sum(losses.values())
        assert isinstance(total, torch.Tensor)
        (grad,) = torch.autograd.grad(total, replacement)
        return total.detach(), grad

    seen: list[int] = []

    def spy(layers: Any) -> AbstractContextManager[None]:
        layers = list(layers)
        seen.extend(list(model.model.layers).index(layer) for layer in layers)
        return lean_layers(layers)

    monkeypatch.setattr(hf_runs, "lean_layers", spy)
    lean = loss_and_grad()
    assert seen == list(range(1, LAYERS))  # the layers after the SAE's; they hold downstream hooks
    monkeypatch.setattr(hf_runs, "lean_layers", lambda layers: contextlib.nullcontext())
    plain = loss_and_grad()
    assert torch.equal(lean[0], plain[0]) and torch.equal(lean[1], plain[1])
    assert lean[1].abs().sum() > 0
