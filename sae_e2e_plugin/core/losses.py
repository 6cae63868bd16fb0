"""Pure loss functions of the end-to-end objectives.

Every function here is a plain function of tensors: no model state, no hooks.
The KL direction is part of each KL function's name: ``kl_orig_to_patched`` is
KL(p_orig ‖ p_patched) = Σ_v p_orig(v) (log p_orig(v) − log p_patched(v)),
the direction the reference implementation's code computes (its docstring says
the opposite; the code is what trained the published SAEs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped

# Maps a chunk of final residuals [tokens, d_model] to logits [tokens, vocab].
ResidToLogits = Callable[[torch.Tensor], torch.Tensor]


@jaxtyped(typechecker=beartype)
def kl_orig_to_patched(
    logits_orig: Float[torch.Tensor, "*tokens vocab"],
    logits_patched: Float[torch.Tensor, "*tokens vocab"],
) -> Float[torch.Tensor, ""]:
    """KL(p_orig ‖ p_patched), summed over the vocabulary, averaged over tokens.

    Both inputs are raw logits; the log-softmax is taken in float32 whatever
    their dtype, since bf16 log-probabilities lose the small differences that
    the KL is made of. The gradient flows into ``logits_patched`` only (``logits_orig``
    are the frozen model's clean logits).
    """
    return kl_orig_to_patched_sum(logits_orig, logits_patched) / _n_tokens(logits_orig)


@jaxtyped(typechecker=beartype)
def kl_orig_to_patched_sum(
    logits_orig: Float[torch.Tensor, "*tokens vocab"],
    logits_patched: Float[torch.Tensor, "*tokens vocab"],
) -> Float[torch.Tensor, ""]:
    """KL(p_orig ‖ p_patched) summed over the vocabulary *and* the tokens.

    Differentiable in ``logits_patched``, with the gradient written out
    (``kl_sum_and_logit_grad``) rather than taken through the log-softmax.
    """
    if logits_patched.requires_grad and torch.is_grad_enabled():
        return _KLSum.apply(logits_orig, logits_patched)
    return _kl_kernel(logits_orig, logits_patched, want_grad=False)[0]


class _KLSum(torch.autograd.Function):
    """Σ KL(p_orig ‖ p_patched) whose gradient is computed with the value (one kernel call)."""

    @staticmethod
    def forward(ctx: Any, logits_orig: torch.Tensor, logits_patched: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        kl_sum, logit_grad = _kl_kernel(logits_orig, logits_patched, want_grad=True)
        ctx.save_for_backward(logit_grad)
        return kl_sum

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (logit_grad,) = ctx.saved_tensors
        return None, grad_output * logit_grad


@dataclass(frozen=True)
class CleanLogProbs:
    """The clean run's next-token log-probabilities for one batch, a chunk of tokens at a time.

    Made once (``clean_log_probs``) when several patched runs are compared with one clean
    run, as the independent SAEs of a multi-SAE step are: each KL then reads its clean chunk
    instead of running the head and the log-softmax on it again. It holds the batch's whole
    [tokens, vocab] in float32 (4 bytes × tokens × vocab), which the chunked KL otherwise
    never keeps.
    """

    chunks: tuple[torch.Tensor, ...]
    """[chunk, vocab] float32 log-probabilities; every chunk but the last has ``chunk_size`` rows."""
    chunk_size: int
    n_tokens: int


@jaxtyped(typechecker=beartype)
def clean_log_probs(
    resid_orig: Float[torch.Tensor, "tokens d_model"],
    resid_to_logits: ResidToLogits,
    chunk_size: int,
) -> CleanLogProbs:
    """The clean log-probabilities of ``resid_orig`` (final residuals), chunk by chunk."""
    if chunk_size < 1:
        raise ValueError(f"kl_chunk_size must be >= 1, got {chunk_size}.")
    with torch.no_grad():
        chunks = tuple(
            F.log_softmax(resid_to_logits(c).float(), dim=-1)
            for (c,) in chunk_rows(chunk_size, resid_orig)
        )
    return CleanLogProbs(chunks, chunk_size, resid_orig.shape[0])


@jaxtyped(typechecker=beartype)
def chunked_kl_orig_to_patched(
    resid_orig: Float[torch.Tensor, "tokens d_model"] | CleanLogProbs,
    resid_patched: Float[torch.Tensor, "tokens d_model"],
    resid_to_logits: ResidToLogits,
    chunk_size: int,
    *,
    compile_kernel: bool = False,
    orig_to_logits: ResidToLogits | None = None,
) -> Float[torch.Tensor, ""]:
    """KL(p_orig ‖ p_patched) from final residual streams, a chunk of tokens at a time.

    ``resid_to_logits`` is the model's head (final norm + unembedding), whose parameters
    must not need gradients (the language model is frozen). Each chunk's logits are made,
    reduced to a KL sum and dropped. When ``resid_patched`` needs a gradient, the chunk's
    gradient with respect to it ([chunk, d_model]) is computed on the spot and kept instead
    of the logits, so the backward pass is one multiplication: no [tokens, vocab] tensor is
    ever kept, and the head runs three times per chunk (clean, patched, its backward) as in
    the unchunked form. The gradient of the KL with respect to the patched logits is
    written out (``kl_sum_and_logit_grad``) rather than taken through the log-softmax.
    The value and gradient equal ``kl_orig_to_patched`` on the full logits up to float
    summation order.

    ``resid_orig`` may instead be the clean log-probabilities made by ``clean_log_probs``
    with the same ``chunk_size``: the clean head then does not run, and value and gradient
    are the same numbers bit for bit.

    ``compile_kernel=True`` runs that elementwise part (about ten passes over each
    [chunk, vocab] block in float32) through ``torch.compile``, which fuses it into a few;
    the first call compiles (tens of seconds on a CPU).

    ``orig_to_logits``: the head for ``resid_orig`` when it differs from the patched side's
    (e.g. run at lower precision: ``clean_run_dtype``); None: ``resid_to_logits``.
    """
    if chunk_size < 1:
        raise ValueError(f"kl_chunk_size must be >= 1, got {chunk_size}.")
    if isinstance(resid_orig, CleanLogProbs):
        _check_cache_fits(resid_orig, resid_patched.shape[0], chunk_size)
    kernel = _compiled_kernel() if compile_kernel else _kl_kernel
    heads = (orig_to_logits or resid_to_logits, resid_to_logits)
    if resid_patched.requires_grad and torch.is_grad_enabled():
        # The inputs' shapes were checked on entry; the per-chunk kernel runs unchecked (the
        # autograd Function's forward runs without grad).
        return _ChunkedKL.apply(resid_orig, resid_patched, heads, chunk_size, kernel)
    total = torch.zeros((), dtype=torch.float32, device=resid_patched.device)
    cached = isinstance(resid_orig, CleanLogProbs)
    with torch.no_grad():
        for index, (patched,) in enumerate(chunk_rows(chunk_size, resid_patched)):
            orig = _clean_chunk(resid_orig, heads[0], index, chunk_size)
            logits = resid_to_logits(patched)
            total += kernel(orig, logits, want_grad=False, cached=cached)[0]
    return total / resid_patched.shape[0]


class _ChunkedKL(torch.autograd.Function):
    """KL over chunks with each chunk's input gradient computed in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        resid_orig: torch.Tensor | CleanLogProbs,
        resid_patched: torch.Tensor,
        heads: tuple[ResidToLogits, ResidToLogits],
        chunk_size: int,
        kernel: KLKernel,
    ) -> torch.Tensor:
        orig_to_logits, resid_to_logits = heads
        n_tokens = resid_patched.shape[0]
        cached = isinstance(resid_orig, CleanLogProbs)
        total = torch.zeros((), dtype=torch.float32, device=resid_patched.device)
        grads = []
        for index, (patched,) in enumerate(chunk_rows(chunk_size, resid_patched)):
            orig = _clean_chunk(resid_orig, orig_to_logits, index, chunk_size)
            with torch.enable_grad():
                leaf = patched.detach().requires_grad_(True)
                logits_patched = resid_to_logits(leaf)
            # Clean logits made here for this chunk are scratch: the gradient overwrites them.
            chunk_sum, logit_grad = kernel(
                orig,
                logits_patched.detach(),
                want_grad=True,
                cached=cached,
                grad_into=None if cached else orig,
            )
            del orig
            # Backward through the head only; the KL's own backward is written out above.
            (grad,) = torch.autograd.grad(logits_patched, leaf, grad_outputs=logit_grad)
            total = total + chunk_sum
            grads.append(grad / n_tokens)
        ctx.save_for_backward(torch.cat(grads))
        return total / n_tokens

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return None, grad_output * grad, None, None, None


def _clean_chunk(
    clean: torch.Tensor | CleanLogProbs, resid_to_logits: ResidToLogits, index: int, size: int
) -> torch.Tensor:
    """Chunk ``index``'s clean logits, or its log-probabilities when they were made already."""
    if isinstance(clean, CleanLogProbs):
        return clean.chunks[index]
    return resid_to_logits(clean[index * size : (index + 1) * size])


def _check_cache_fits(cache: CleanLogProbs, n_tokens: int, chunk_size: int) -> None:
    if cache.n_tokens != n_tokens or cache.chunk_size != chunk_size:
        raise ValueError(
            f"the clean log-probabilities were made for {cache.n_tokens} tokens in chunks of "
            f"{cache.chunk_size}, but the patched run has {n_tokens} tokens and "
            f"kl_chunk_size={chunk_size}; make them with clean_log_probs(..., {chunk_size}) "
            "from this batch's clean run."
        )


@jaxtyped(typechecker=beartype)
def kl_sum_and_logit_grad(
    logits_orig: Float[torch.Tensor, "tokens vocab"],
    logits_patched: Float[torch.Tensor, "tokens vocab"],
) -> tuple[Float[torch.Tensor, ""], Float[torch.Tensor, "tokens vocab"]]:
    """Σ KL(p_orig ‖ p_patched) over [tokens, vocab] logits, and its gradient w.r.t. the patched logits.

    The gradient of Σ_v p_orig(v) (log p_orig(v) − log_softmax(z)(v)) with respect to
    the patched logits z is softmax(z) − p_orig, token by token; it comes back in
    ``logits_patched``'s dtype. Everything is computed in float32 without autograd, a block of
    rows at a time, so beyond its inputs a call needs the gradient it returns and a few
    float32 blocks of about 8 MiB each (on a CPU).
    """
    kl_sum, logit_grad = _kl_kernel(logits_orig, logits_patched, want_grad=True)
    assert logit_grad is not None
    return kl_sum, logit_grad


def _kl_kernel(
    logits_orig: torch.Tensor,
    logits_patched: torch.Tensor,
    want_grad: bool,
    cached: bool = False,
    block: KLBlock | None = None,
    grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # The one place the KL arithmetic is written: every KL function above calls it.
    # ``cached``: ``logits_orig`` are the clean log-probabilities (``CleanLogProbs``), read
    # again by later patched runs, so never written to. The float32 work runs a block of rows
    # at a time, in the CPU's cache; only the KL sum's order of additions differs from one pass.
    # ``grad_into``: a tensor like ``logits_patched`` that may be overwritten (the chunk's clean
    # logits): each block's gradient goes into the rows it has just read, so the chunk needs
    # no [tokens, vocab] gradient buffer of its own.
    vocab = logits_patched.shape[-1]
    orig, patched = logits_orig.reshape(-1, vocab), logits_patched.reshape(-1, vocab)
    grad = None
    if want_grad:
        scratch = grad_into if _same_layout(grad_into, logits_patched) else None
        grad = torch.empty_like(patched) if scratch is None else scratch.view(patched.shape)
    total = torch.zeros((), dtype=torch.float32, device=patched.device)
    # Eager blocks share three buffers (a fresh 8 MiB tensor per operation costs more in page
    # faults than its arithmetic); a compiled block fuses its passes, which buffers would undo.
    rows_per_block = _rows_per_block(vocab, patched.device)
    shape = (min(rows_per_block, patched.shape[0]), vocab)
    scratch = [] if block else [patched.new_empty(shape, dtype=torch.float32) for _ in range(3)]
    with torch.no_grad():
        for start in range(0, patched.shape[0], rows_per_block):
            rows = slice(start, start + rows_per_block)
            args = (orig[rows], patched[rows], want_grad, cached, *scratch)
            kl_sum, logit_grad = (block or _kl_block)(*args)
            total += kl_sum
            if grad is not None and logit_grad is not None:
                grad[rows] = logit_grad
    return total, None if grad is None else grad.reshape(logits_patched.shape)


def _same_layout(scratch: torch.Tensor | None, like: torch.Tensor) -> bool:
    if scratch is None:
        return False
    same = scratch.dtype == like.dtype and scratch.shape == like.shape
    return same and scratch.device == like.device and scratch.is_contiguous()


def _kl_block(
    logits_orig: torch.Tensor,
    logits_patched: torch.Tensor,
    want_grad: bool,
    cached: bool,
    *scratch: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ KL of a block of rows, and softmax(patched) − p_orig (float32) when ``want_grad``.

    ``scratch``: three float32 buffers of at least the block's rows, which the block
    overwrites (the gradient it returns is one of them); none: fresh ones.
    """
    fresh = [torch.empty_like(logits_patched, dtype=torch.float32) for _ in range(3 - len(scratch))]
    work, logp_orig, logp_patched = (b[: logits_patched.shape[0]] for b in [*scratch, *fresh])
    if cached:
        diff = torch.sub(logits_orig, _log_probs(logits_patched, work, logp_patched), out=logp_orig)
        p_orig = torch.exp(logits_orig, out=work)
    else:
        _log_probs(logits_orig, work, logp_orig)
        _log_probs(logits_patched, work, logp_patched)
        p_orig = torch.exp(logp_orig, out=work)
        diff = logp_orig.sub_(logp_patched)
    kl_sum = diff.mul_(p_orig).sum()
    if not want_grad:
        return kl_sum, None
    return kl_sum, logp_patched.exp_().sub_(p_orig)


KLBlock = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]
"""``_kl_block`` or its compiled form: (orig, patched, want_grad, cached, *scratch)."""

KLKernel = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]
"""``_kl_kernel`` or its compiled form: (orig, patched, want_grad, cached, grad_into=None)."""

# Elements of one float32 block: 8 MiB on a CPU, so that a block's temporaries stay in the
# cache; a GPU runs one kernel per operation and block, so it gets fewer, larger blocks.
_BLOCK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def _rows_per_block(vocab: int, device: torch.device) -> int:
    return max(1, _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cuda"]) // vocab)


def _log_probs(logits: torch.Tensor, work: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    # Float32 whatever the logits' dtype: the KL is made of small differences of these.
    # ``work`` takes the float32 copy of lower-precision logits, ``out`` the result.
    if logits.dtype != torch.float32:
        logits = work.copy_(logits)
    return torch.log_softmax(logits, dim=-1, out=out)


@functools.cache
def _compiled_kernel() -> KLKernel:
    # dynamic=True: the last block is usually shorter; one compiled block serves every length.
    compiled = torch.compile(_kl_block, dynamic=True)
    from torch._dynamo.exc import BackendCompilerFailed

    def run(
        logits_orig: torch.Tensor,
        logits_patched: torch.Tensor,
        want_grad: bool,
        cached: bool = False,
        grad_into: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            return _kl_kernel(logits_orig, logits_patched, want_grad, cached, compiled, grad_into)
        except BackendCompilerFailed as error:
            reason = str(error).strip().splitlines()[0][:300]
            raise RuntimeError(
                f"compile_kl=True, but torch.compile could not build the KL kernel ({reason}). "
                "It needs a C++ compiler on the CPU (e.g. apt install g++) or Triton on a GPU; "
                "or set compile_kl=False (same results, a little slower)."
            ) from error

    return run


def chunk_rows(chunk_size: int, *tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The same rows of each tensor, ``chunk_size`` rows at a time (the last chunk may be shorter).

    The one chunk loop of the package: the training KL and the evaluation's logits use it,
    so no [tokens, vocab] tensor of a whole batch is made.
    """
    for start in range(0, tensors[0].shape[0], chunk_size):
        yield tuple(t[start : start + chunk_size] for t in tensors)


@jaxtyped(typechecker=beartype)
def mse_mean(
    patched: Float[torch.Tensor, "*shape"],
    target: Float[torch.Tensor, "*shape"],
) -> Float[torch.Tensor, ""]:
    """Mean squared error averaged over every element (batch, position and d_model).

    This is the reference implementation's downstream term
    (``F.mse_loss(..., reduction="mean")``), computed in float32.
    """
    return F.mse_loss(patched.float(), target.float(), reduction="mean")


def downstream_loss(
    patched: dict[str, torch.Tensor],
    clean: dict[str, torch.Tensor],
    total_coefficient: float,
) -> dict[str, torch.Tensor]:
    """Weighted downstream terms, one per hook: (total_coefficient / n_hooks) · MSE_k.

    The coefficient is split evenly across the hooks, as in the reference
    implementation, so adding hooks does not change the term's overall weight.
    """
    if set(patched) != set(clean):
        raise ValueError(
            f"downstream hooks differ between runs: patched {sorted(patched)}, "
            f"clean {sorted(clean)}."
        )
    per_hook = total_coefficient / max(len(patched), 1)
    return {name: per_hook * mse_mean(patched[name], clean[name]) for name in patched}


def _n_tokens(logits: torch.Tensor) -> int:
    return max(logits[..., 0].numel(), 1)


@jaxtyped(typechecker=beartype)
def adaptive_kl_mse(
    kl: Float[torch.Tensor, ""],
    mse: Float[torch.Tensor, ""],
) -> tuple[Float[torch.Tensor, ""], Float[torch.Tensor, ""], Float[torch.Tensor, ""]]:
    """The adaptive KL/MSE mix ``0.5 × (α·KL + MSE)``, ``α = (MSE / KL)`` detached.

    Returns the two halves ``0.5·α·KL`` and ``0.5·MSE`` (they add up to the mix) and ``α``.
    α is recomputed from each batch and carries no gradient, so the KL term's value equals
    the MSE's and the loss stays on the MSE's scale (Karvonen 2025, arXiv 2503.17272).
    """
    alpha = (mse / kl).detach()
    return 0.5 * alpha * kl, 0.5 * mse, alpha
