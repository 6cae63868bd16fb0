"""The loss functions against hand-written formulas."""

from __future__ import annotations

import pytest
import torch
from beartype.roar import BeartypeCallHintParamViolation
from jaxtyping import TypeCheckError

from sae_e2e_plugin.core import losses
from sae_e2e_plugin.core.losses import (
    chunked_kl_orig_to_patched,
    clean_log_probs,
    downstream_loss,
    kl_orig_to_patched,
    kl_sum_and_logit_grad,
    mse_mean,
)


def hand_kl(logits_orig: torch.Tensor, logits_patched: torch.Tensor) -> torch.Tensor:
    """Σ_v p_orig (log p_orig − log p_patched), averaged over tokens, written out longhand."""
    p = torch.softmax(logits_orig.double(), dim=-1)
    q = torch.softmax(logits_patched.double(), dim=-1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    return per_token.mean()


def test_kl_matches_hand_formula_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    orig = torch.randn(3, 5, 11, generator=gen) * 3
    patched = torch.randn(3, 5, 11, generator=gen) * 3
    kl = kl_orig_to_patched(orig, patched)
    torch.testing.assert_close(kl.double(), hand_kl(orig, patched), rtol=1e-5, atol=1e-6)
    assert kl.item() > 0.1


def test_kl_direction_is_orig_to_patched() -> None:
    # KL is asymmetric; swapping the arguments must give the other direction.
    orig = torch.tensor([[4.0, 0.0, 0.0]])
    patched = torch.tensor([[0.0, 0.0, 0.0]])
    forward = kl_orig_to_patched(orig, patched).item()
    backward = kl_orig_to_patched(patched, orig).item()
    assert forward == pytest.approx(hand_kl(orig, patched).item(), rel=1e-5)
    assert abs(forward - backward) > 0.1


def test_kl_is_zero_for_identical_logits() -> None:
    logits = torch.randn(2, 4, 9)
    assert kl_orig_to_patched(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_in_bf16_inputs_is_computed_in_float32() -> None:
    orig = torch.randn(4, 7, 13)
    patched = torch.randn(4, 7, 13)
    kl = kl_orig_to_patched(orig.bfloat16(), patched.bfloat16())
    assert kl.dtype == torch.float32
    expected = hand_kl(orig.bfloat16().float(), patched.bfloat16().float())
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 64])
def test_chunked_kl_equals_unchunked_value_and_gradient(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    d_model, vocab, n_tokens = 6, 17, 21
    unembed = torch.randn(d_model, vocab, generator=gen)

    def head(resid: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(resid, (d_model,)) @ unembed

    orig = torch.randn(n_tokens, d_model, generator=gen)
    patched_a = torch.randn(n_tokens, d_model, generator=gen, requires_grad=True)
    patched_b = patched_a.detach().clone().requires_grad_(True)

    full = kl_orig_to_patched(head(orig), head(patched_a))
    full.backward()
    chunked = chunked_kl_orig_to_patched(orig, patched_b, head, chunk_size=chunk_size)
    chunked.backward()

    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    assert patched_a.grad is not None and patched_b.grad is not None
    # 1e-5 relative to the gradient's scale (single elements near zero differ in the last bits).
    scale = patched_a.grad.abs().max().item()
    torch.testing.assert_close(patched_b.grad, patched_a.grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_logit_gradient_equals_autograd_of_the_hand_formula(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    orig = (torch.randn(9, 31, generator=gen) * 4).to(dtype)
    patched = (torch.randn(9, 31, generator=gen) * 4).to(dtype)
    kl_sum, grad = kl_sum_and_logit_grad(orig, patched)
    assert kl_sum.dtype == torch.float32 and grad.dtype == dtype
    leaf = patched.double().requires_grad_(True)
    expected = hand_kl(orig.double(), leaf) * 9  # summed over the 9 tokens
    expected.backward()
    assert leaf.grad is not None
    torch.testing.assert_close(kl_sum.double(), expected.detach(), rtol=1e-5, atol=0)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # the gradient is rounded to bf16
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=tolerance, atol=tolerance * 1e-2)
    # The inputs are left as they were (the float32 work is done in fresh buffers).
    torch.testing.assert_close(
        orig, (torch.randn(9, 31, generator=gen.manual_seed(2)) * 4).to(dtype)
    )


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_worked_in_blocks_of_rows_gives_the_same_gradient_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, cached: bool
) -> None:
    # The kernel's float32 work runs a block of rows at a time (8 MiB blocks on a CPU). Every
    # row's log-probabilities and gradient are the same numbers as in one block; only the KL
    # sum adds its blocks' sums in another order. Blocks of 3 rows, 9 rows (the last short):
    gen = torch.Generator().manual_seed(5)
    orig = (torch.randn(9, 31, generator=gen) * 4).to(dtype)
    patched = (torch.randn(9, 31, generator=gen) * 4).to(dtype)
    if cached:  # the clean log-probabilities, made once (CleanLogProbs) and never written to
        orig = torch.log_softmax(orig.float(), dim=-1)
    kept = orig.clone()
    one_sum, one_grad = losses._kl_kernel(orig, patched, want_grad=True, cached=cached)
    monkeypatch.setitem(losses._BLOCK_ELEMENTS, "cpu", 3 * 31)
    assert losses._rows_per_block(31, torch.device("cpu")) == 3
    blocked_sum, blocked_grad = losses._kl_kernel(orig, patched, want_grad=True, cached=cached)
    assert one_grad is not None and blocked_grad is not None
    assert blocked_grad.dtype == dtype and torch.equal(blocked_grad, one_grad)
    torch.testing.assert_close(blocked_sum, one_sum, rtol=1e-6, atol=0)
    assert torch.equal(orig, kept)
    # The chunked KL hands its own clean logits over as the gradient's buffer.
    scratch = patched.clone()
    _, into_grad = losses._kl_kernel(orig, patched, want_grad=True, grad_into=scratch)
    assert into_grad is not None and into_grad.data_ptr() == scratch.data_ptr()
    if not cached:
        assert torch.equal(into_grad, one_grad)
    p = torch.softmax(kept.double(), -1) if not cached else kept.double().exp()
    hand = (p * (p.log() - torch.log_softmax(patched.double(), -1))).sum()
    torch.testing.assert_close(blocked_sum.double(), hand, rtol=1e-5, atol=0)


def test_written_out_logit_gradient_checks_its_shapes() -> None:
    # Mismatched logits get an error that names the argument, not one from inside torch.
    with pytest.raises((TypeCheckError, BeartypeCallHintParamViolation), match="logits_patched"):
        kl_sum_and_logit_grad(torch.randn(4, 31), torch.randn(4, 30))


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_clean_log_probs_made_once_give_the_same_kl_and_gradient_bit_for_bit(
    chunk_size: int,
) -> None:
    gen = torch.Generator().manual_seed(3)
    head_weight = torch.randn(6, 40, generator=gen)

    def head(resid: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(resid, (6,)) @ head_weight

    orig = torch.randn(23, 6, generator=gen)
    cache = clean_log_probs(orig, head, chunk_size)
    kept = [chunk.clone() for chunk in cache.chunks]
    assert [c.shape[0] for c in cache.chunks] == [
        len(r) for r in torch.arange(23).split(chunk_size)
    ]
    for seed in (4, 5):  # two patched runs read one cache, as two independent SAEs do
        results = []
        for clean in (orig, cache):
            patched = torch.randn(23, 6, generator=torch.Generator().manual_seed(seed))
            patched.requires_grad_(True)
            kl = chunked_kl_orig_to_patched(clean, patched, head, chunk_size=chunk_size)
            kl.backward()
            with torch.no_grad():
                no_grad_kl = chunked_kl_orig_to_patched(clean, patched, head, chunk_size)
            results.append((kl.detach(), no_grad_kl, patched.grad))
        (kl_a, kl_a_nograd, grad_a), (kl_b, kl_b_nograd, grad_b) = results
        assert kl_a > 0.1 and grad_a is not None and grad_b is not None
        assert torch.equal(kl_a, kl_b) and torch.equal(kl_a_nograd, kl_b_nograd)
        assert torch.equal(grad_a, grad_b)
    # Reading the cache leaves it as it was (the kernel works in fresh buffers for it).
    assert all(torch.equal(a, b) for a, b in zip(cache.chunks, kept, strict=True))
    torch.testing.assert_close(
        torch.cat(cache.chunks), torch.log_softmax(head(orig), dim=-1), rtol=1e-6, atol=1e-6
    )


def test_clean_log_probs_of_another_batch_or_chunking_are_refused() -> None:
    head_weight = torch.randn(6, 40)
    cache = clean_log_probs(torch.randn(20, 6), lambda r: r @ head_weight, 8)
    with pytest.raises(ValueError, match=r"20 tokens in chunks of 8.*kl_chunk_size=4"):
        chunked_kl_orig_to_patched(cache, torch.randn(20, 6), lambda r: r @ head_weight, 4)
    with pytest.raises(ValueError, match=r"patched run has 16 tokens"):
        chunked_kl_orig_to_patched(cache, torch.randn(16, 6), lambda r: r @ head_weight, 8)


def test_compiled_kernel_gives_the_eager_value_and_gradient() -> None:
    gen = torch.Generator().manual_seed(5)
    head_weight = torch.randn(6, 40, generator=gen)
    orig = torch.randn(23, 6, generator=gen)
    cache = clean_log_probs(orig, lambda r: r @ head_weight, 10)
    results = []
    for compiled, clean in ((False, orig), (True, orig), (True, cache)):
        patched = torch.randn(23, 6, generator=torch.Generator().manual_seed(6)).requires_grad_(
            True
        )
        kl = chunked_kl_orig_to_patched(
            clean, patched, lambda r: r @ head_weight, chunk_size=10, compile_kernel=compiled
        )
        kl.backward()
        results.append((kl.detach(), patched.grad))
    (eager_kl, eager_grad), *compiled_results = results
    assert eager_kl > 0.1
    for compiled_kl, compiled_grad in compiled_results:
        torch.testing.assert_close(compiled_kl, eager_kl, rtol=1e-5, atol=0)
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-5, atol=1e-7)


def test_a_failed_compile_names_the_setting_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_compile(fn: object, **kwargs: object) -> object:
        def fail(*args: object) -> None:
            raise torch._dynamo.exc.BackendCompilerFailed(
                fake_compile, RuntimeError("no g++ found"), None
            )

        return fail

    monkeypatch.setattr(torch, "compile", fake_compile)
    losses._compiled_kernel.cache_clear()
    try:
        x = torch.randn(4, 3, requires_grad=True)
        with pytest.raises(
            RuntimeError, match=r"compile_kl=True.*C\+\+ compiler.*compile_kl=False"
        ):
            chunked_kl_orig_to_patched(
                x.detach(), x, lambda r: r, chunk_size=2, compile_kernel=True
            )
    finally:
        losses._compiled_kernel.cache_clear()


def test_chunked_kl_rejects_bad_chunk_size() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl_chunk_size must be >= 1"):
        chunked_kl_orig_to_patched(x, x, lambda r: r, chunk_size=0)


def test_mse_mean_averages_over_every_element() -> None:
    a = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    b = torch.zeros(2, 3, 4)
    assert mse_mean(a, b).item() == pytest.approx(float((a**2).sum() / 24))


def test_downstream_coefficient_is_split_evenly_over_hooks() -> None:
    clean = {"h1": torch.zeros(2, 3), "h2": torch.zeros(2, 3)}
    patched = {"h1": torch.ones(2, 3), "h2": 2 * torch.ones(2, 3)}
    terms = downstream_loss(patched, clean, total_coefficient=3.0)
    assert terms["h1"].item() == pytest.approx(1.5 * 1.0)
    assert terms["h2"].item() == pytest.approx(1.5 * 4.0)


def test_wrong_shapes_raise_a_readable_error() -> None:
    with pytest.raises((TypeCheckError, BeartypeCallHintParamViolation), match="vocab"):
        kl_orig_to_patched(torch.zeros(2, 5), torch.zeros(2, 6))
