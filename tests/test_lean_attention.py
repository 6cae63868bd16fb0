"""``core.lean_attention``: the flash forward with a backward pass of a few large products.

The gradients are checked against causal attention written out in float64, and against the
flash kernel's own backward: the lean one must be at least about as close to float64 as flash
is. The forward must be flash's, bit for bit, inside a real (tiny) Llama; everything the lean
path does not cover must go to transformers' own ``sdpa`` function."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_lean_layers import TOKENS, layer_inputs, tiny_llama
from transformers import LlamaConfig

from sae_e2e_plugin.core import lean_attention
from sae_e2e_plugin.core.lean_attention import (
    FlashForwardMathBackward,
    attention_grads,
)
from sae_e2e_plugin.core.lean_attention import (
    lean_attention as lean_attention_block,
)

BATCH, HEADS, KV_HEADS, POS, HEAD_DIM = 3, 6, 2, 16, 8


def qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, HEADS, POS, HEAD_DIM), (BATCH, KV_HEADS, POS, HEAD_DIM)]
    q, k, v = (torch.randn(shapes[i > 0], generator=gen) for i in range(3))
    grad_out = torch.randn(shapes[0], generator=gen)
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), grad_out.bfloat16()


def hand_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d + causal mask) V, each query head reading key/value head h // groups."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, -torch.inf), dim=-1) @ v


def grads_of(attend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attend(*leaves)
    return out, torch.autograd.grad(out, leaves, g.to(out.dtype))


def test_gradients_are_as_close_to_float64_as_the_flash_backward() -> None:
    q, k, v, g = qkv()
    _, exact = grads_of(hand_attention, q.double(), k.double(), v.double(), g)
    lean_out, lean = grads_of(
        lambda *t: FlashForwardMathBackward.apply(*t, HEAD_DIM**-0.5), q, k, v, g
    )

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    flash_out, flashed = grads_of(flash, q, k, v, g)
    assert torch.equal(lean_out, flash_out)  # the forward is flash's own
    for name, ours, theirs, want in zip("qkv", lean, flashed, exact, strict=True):
        assert ours.dtype == torch.bfloat16 and ours.shape == want.shape
        our_error = (ours.double() - want).norm() / want.norm()
        flash_error = (theirs.double() - want).norm() / want.norm()
        assert our_error < 1e-2, name  # bf16 rounding: 2e-3 to 3e-3 here
        assert our_error < 1.25 * flash_error, name  # measured: 0.74 to 1.03 times flash's


def test_a_batch_worked_a_few_sequences_at_a_time_gives_the_same_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q, k, v, g = qkv(seed=1)
    apply = lambda *t: FlashForwardMathBackward.apply(*t, HEAD_DIM**-0.5)  # noqa: E731
    _, whole = grads_of(apply, q, k, v, g)
    # Weights of one sequence are HEADS · POS² float32 numbers: room for one at a time.
    monkeypatch.setattr(lean_attention, "_BLOCK_BYTES", 4 * HEADS * POS**2)
    _, blocked = grads_of(apply, q, k, v, g)
    for a, b in zip(whole, blocked, strict=True):
        assert torch.equal(a, b)


def test_attention_grads_checks_its_shapes() -> None:
    q, k, v, g = qkv()
    lse = torch.zeros(BATCH, HEADS, POS)
    with pytest.raises(Exception, match="kv_heads|pos|head_dim"):
        attention_grads(q, k[:, :, :-1], v, q, lse, g, 1.0)


def run_model(model: Any, lean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the gradient w.r.t. the hidden state entering layer 0, with grad wanted."""
    hidden, kwargs = layer_inputs(model)
    # A training run uses no cache (test_lean_layers' run made one, which would grow the keys).
    kwargs = {k: v for k, v in kwargs.items() if k != "cache"} | {"use_cache": False}
    x = hidden.detach().clone().requires_grad_(True)
    layers = list(model.model.layers)
    with lean_attention_block(model) if lean else torch.enable_grad():
        out = x
        for layer in layers:
            result = layer(out, **kwargs)
            out = result[0] if isinstance(result, tuple) else result
    logits = model.lm_head(model.model.norm(out))
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape).to(logits.dtype)
    (grad,) = torch.autograd.grad(logits, x, weights)
    return logits, grad


def test_a_bf16_llama_gives_the_same_logits_and_close_gradients_and_is_restored() -> None:
    model = tiny_llama(torch.bfloat16)
    calls = {"lean": 0}
    original = FlashForwardMathBackward.apply

    def count(*args: Any) -> Any:
        calls["lean"] += 1
        return original(*args)

    plain_logits, plain_grad = run_model(model, lean=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlashForwardMathBackward, "apply", count)
        lean_logits, lean_grad = run_model(model, lean=True)
    assert calls["lean"] == len(model.model.layers)
    assert torch.equal(lean_logits, plain_logits)
    difference = (lean_grad.float() - plain_grad.float()).norm() / plain_grad.float().norm()
    assert 0 < difference < 2e-2  # both round to bf16, in different places
    assert model.config._attn_implementation == "sdpa"


def lean_calls(case: str) -> int:
    """How many times one attention call of a bf16 tiny Llama's layer 0 takes the lean path,
    for the plain case (``""``) or one thing the lean path does not cover."""
    model = tiny_llama(torch.float32 if case == "float32" else torch.bfloat16)
    q, k, v, _ = qkv()
    q, k, v = (t[:, :2] if i == 0 else t[:, :1] for i, t in enumerate((q, k, v)))
    if case == "too long":
        q, k, v = (t.repeat(1, 1, 9, 1) for t in (q, k, v))  # 144 > MAX_POSITIONS positions
    q, k, v = (t.to(model.dtype).requires_grad_(case != "no grad") for t in (q, k, v))
    extra: dict[str, Any] = {"position_ids": torch.arange(q.shape[2])[None], "use_cache": False}
    extra |= {"sliding window": {"sliding_window": 4}, "sinks": {"s_aux": torch.zeros(2)}}.get(
        case, {}
    )
    mask = torch.zeros(1, 1, POS, POS, dtype=model.dtype) if case == "mask" else None
    seen: list[Any] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlashForwardMathBackward, "apply", lambda *a: seen.append(a) or a[0])
        attn = model.model.layers[0].self_attn
        assert isinstance(attn, torch.nn.Module)
        lean_attention.attention(attn, q, k, v, mask, scaling=HEAD_DIM**-0.5, **extra)
    return len(seen)


def test_the_plain_case_takes_the_lean_path() -> None:
    assert lean_calls("") == 1


@pytest.mark.parametrize(
    "case", ["no grad", "float32", "mask", "too long", "sliding window", "sinks"]
)
def test_what_the_lean_path_does_not_cover_goes_to_sdpa(case: str) -> None:
    assert lean_calls(case) == 0


def test_a_model_not_on_sdpa_or_with_sub_configs_is_left_alone() -> None:
    model = tiny_llama(torch.bfloat16)
    model.config._attn_implementation = "eager"
    with lean_attention_block(model):
        assert model.config._attn_implementation == "eager"
    model.config._attn_implementation = "sdpa"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model.config), "sub_configs", {"vision_config": LlamaConfig})
        with lean_attention_block(model):
            assert model.config._attn_implementation == "sdpa"


def test_the_model_is_switched_back_even_when_the_block_raises() -> None:
    model = tiny_llama(torch.bfloat16)
    with pytest.raises(RuntimeError, match="boom"), lean_attention_block(model):
        assert model.config._attn_implementation == lean_attention.NAME
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(TOKENS)  # still runs with the model's own attention
