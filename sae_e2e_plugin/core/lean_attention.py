"""Attention whose backward pass is a few large matrix products: short bf16 runs on a CPU.

PyTorch's CPU flash attention is quick forward, but its bf16 backward pass is slow at short
sequences, where it works through small blocks of queries with small bf16 products. On
SmolLM2-135M at 8 × 128 tokens (9 query heads, 3 key/value heads) a layer's flash backward
takes about 20 ms against 4 ms forward. ``FlashForwardMathBackward`` keeps what flash attention
keeps (queries, keys, values, output and the log-sum-exp of each query's scores), and its
backward pass remakes the attention weights from them and takes the three gradients in five
batched products: about half the time (9.5 ms a layer in a profile of the training step).

The forward pass is the flash kernel itself, so outputs are the same bit for bit. The gradients
are exact up to rounding, like the flash backward's, and at least as close to a float64
computation; the two round in different places, so a bf16 model's gradient at the SAE differs
by about 1% between them, while either is about 25% from the float32 model's.

``lean_attention(model)`` switches a Hugging Face model's ``sdpa`` attention to ``attention``
inside the block. ``attention`` takes the path above only where it pays and is the same
computation: a bf16 model on a CPU, a gradient wanted, causal self-attention over at most
``MAX_POSITIONS`` positions, no mask, dropout, sliding window or other extra; everything else is
transformers' own ``sdpa`` function. From 192 positions on, the flash backward is faster.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from beartype import beartype
from jaxtyping import BFloat16, Float, jaxtyped

MAX_POSITIONS = 128
"""Longest sequence whose backward pass runs here (measured crossover, docs/performance.md)."""

NAME = "sae_e2e_lean_sdpa"
"""The name ``attention`` is registered under in transformers' ``AttentionInterface``."""

# Keyword arguments a decoder layer hands every attention function that do not change what a
# training run's attention computes (no cache is used, the positions are already rotated in).
_INERT = frozenset({"position_ids", "use_cache", "cache_position"})

# Float32 bytes of the attention weights made at once in the backward pass; a longer batch is
# worked through a few sequences at a time.
_BLOCK_BYTES = 1 << 24


@contextmanager
def lean_attention(model: Any) -> Iterator[None]:
    """Inside the block, ``model`` (a Hugging Face model using ``sdpa``) calls ``attention``."""
    config: Any = getattr(model, "config", None)
    if not _switchable(config) or not _register():
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def _switchable(config: Any) -> bool:
    # A config with sub-configs (a multimodal model's) passes the setting on to them, and
    # switching back would overwrite what they had: such a model is left alone.
    if config is None or getattr(config, "sub_configs", None):
        return False
    return getattr(config, "_attn_implementation", None) == "sdpa"


@functools.cache  # once per process: every continuation of every step enters the block
def _register() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.48: no interface to register with; nothing changes
        return False
    if not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return False  # torch < 2.2
    AttentionInterface.register(NAME, attention)
    return True


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature: [batch, heads, pos, head_dim] in,
    [batch, pos, heads, head_dim] out."""
    if _takes_the_lean_path(module, query, key, attention_mask, dropout, is_causal, kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        output = FlashForwardMathBackward.apply(query, key, value, scale)
        return output.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
    )


def _takes_the_lean_path(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> bool:
    wanted = torch.is_grad_enabled() and query.requires_grad
    plain = attention_mask is None and dropout == 0.0 and is_causal is not False
    extras = all(
        name in _INERT or value is None or value is False for name, value in kwargs.items()
    )
    shape = 1 < query.shape[2] == key.shape[2] <= MAX_POSITIONS
    grouped = query.shape[1] % key.shape[1] == 0
    on_cpu = query.device.type == "cpu" and query.dtype == torch.bfloat16
    causal = getattr(module, "is_causal", True)
    return wanted and plain and extras and shape and grouped and on_cpu and causal


class FlashForwardMathBackward(torch.autograd.Function):
    """Causal attention: the flash kernel forward, ``attention_grads`` backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        groups = query.shape[1] // key.shape[1]
        # The kernel wants a key and value per query head, as sdpa's enable_gqa hands it them.
        keys, values = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        output, logsumexp = flash(query, keys, values, 0.0, True, scale=scale)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        query, key, value, output, logsumexp = ctx.saved_tensors
        _, heads, pos, _ = query.shape
        per_block = max(1, _BLOCK_BYTES // (4 * heads * pos**2))
        blocks = []
        for start in range(0, query.shape[0], per_block):
            rows = slice(start, start + per_block)
            blocks.append(
                attention_grads(
                    query[rows],
                    key[rows],
                    value[rows],
                    output[rows],
                    logsumexp[rows],
                    grad_output[rows],
                    ctx.scale,
                )
            )
        if len(blocks) == 1:
            return *blocks[0], None
        return *(torch.cat(parts) for parts in zip(*blocks, strict=True)), None


@jaxtyped(typechecker=beartype)
def attention_grads(
    query: BFloat16[torch.Tensor, "batch heads pos head_dim"],
    key: BFloat16[torch.Tensor, "batch kv_heads pos head_dim"],
    value: BFloat16[torch.Tensor, "batch kv_heads pos head_dim"],
    output: BFloat16[torch.Tensor, "batch heads pos head_dim"],
    logsumexp: Float[torch.Tensor, "batch heads pos"],
    grad_output: BFloat16[torch.Tensor, "batch heads pos head_dim"],
    scale: float,
) -> tuple[
    BFloat16[torch.Tensor, "batch heads pos head_dim"],
    BFloat16[torch.Tensor, "batch kv_heads pos head_dim"],
    BFloat16[torch.Tensor, "batch kv_heads pos head_dim"],
]:
    """The gradients of causal attention w.r.t. query, key and value, from the forward's
    output and log-sum-exp: P = exp(scale·QKᵀ − lse) (causal), dV = Pᵀ dO,
    dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = scale·dS K, dK = scale·dSᵀ Q.

    The query heads sharing a key/value head are stacked along the positions ([batch,
    kv_heads, groups·pos, head_dim]), so each product covers a whole group and the key and
    value gradients come out summed over it. The scores and the weights' gradient are made
    from float32 operands and stay float32; the three gradients' products take bf16 operands.
    Measured against float64 at SmolLM2's shapes (8 × 128 tokens), each gradient is as close
    as the flash backward's or closer (tests/test_lean_attention.py)."""
    batch, heads, pos, head_dim = query.shape
    kv_heads = key.shape[1]
    rows = (batch, kv_heads, heads // kv_heads * pos, head_dim)
    stacked_query, stacked_grad = query.reshape(rows), grad_output.reshape(rows)
    future = torch.ones(pos, pos, dtype=torch.bool, device=query.device).triu_(1)
    scores = torch.matmul(stacked_query.float(), key.float().transpose(-1, -2)).mul_(scale)
    weights = scores.view(batch, kv_heads, -1, pos, pos).masked_fill_(future, -torch.inf)
    weights = weights.sub_(logsumexp.reshape(*weights.shape[:4], 1)).exp_().view(scores.shape)
    grad_weights = torch.matmul(stacked_grad.float(), value.float().transpose(-1, -2))
    dtype = query.dtype
    grad_value = torch.matmul(weights.to(dtype).transpose(-1, -2), stacked_grad)
    rowsum = torch.linalg.vecdot(grad_output.float(), output.float()).reshape(*rows[:3], 1)
    grad_scores = weights.mul_(grad_weights.sub_(rowsum)).mul_(scale).to(dtype)
    grad_query = torch.matmul(grad_scores, key).view(query.shape)
    grad_key = torch.matmul(grad_scores.transpose(-1, -2), stacked_query)
    return grad_query, grad_key, grad_value
