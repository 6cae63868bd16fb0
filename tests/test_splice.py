"""The clean and patched runs against plain TransformerLens calls."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL, VOCAB, tiny_model
from transformer_lens import HookedTransformer

from sae_e2e_plugin.core.losses import kl_orig_to_patched
from sae_e2e_plugin.core.model_splice import run_clean, run_patched
from sae_e2e_plugin.core.splice import (
    logits_from_final_resid,
    plan_splice,
    run_prefix,
)


def random_tokens(batch: int = 3, pos: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


HOOKS = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_mlp_out",
    "blocks.2.hook_resid_post",
    "blocks.1.attn.hook_z",
    "hook_embed",
]


@pytest.mark.parametrize("hook_name", HOOKS)
def test_shared_prefix_patched_run_equals_full_rerun(
    model: HookedTransformer, hook_name: str
) -> None:
    tokens = random_tokens()
    plan = plan_splice(model, hook_name, None)
    prefix = run_prefix(model, tokens, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    replacement = clean.acts + 0.5 * torch.randn_like(clean.acts)

    patched = run_patched(model, prefix, plan, replacement)
    ours = logits_from_final_resid(model, patched.final_resid)

    def replace(act: torch.Tensor, hook: object) -> torch.Tensor:
        return replacement.reshape(act.shape)

    expected = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, replace)])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - model(tokens)).abs().max() > 1e-3  # the splice really changed something


def test_clean_run_reproduces_the_model(model: HookedTransformer) -> None:
    tokens = random_tokens()
    plan = plan_splice(model, "blocks.1.hook_resid_pre", None)
    clean = run_clean(model, run_prefix(model, tokens, 1), plan)
    _, cache = model.run_with_cache(tokens)
    assert clean.final_resid is not None
    torch.testing.assert_close(logits_from_final_resid(model, clean.final_resid), model(tokens))
    torch.testing.assert_close(clean.acts, cache["blocks.1.hook_resid_pre"])
    for name in plan.downstream_hooks:
        torch.testing.assert_close(clean.downstream[name], cache[name])


def test_identity_splice_gives_zero_kl(model: HookedTransformer) -> None:
    tokens = random_tokens()
    plan = plan_splice(model, "blocks.1.hook_resid_pre", None)
    prefix = run_prefix(model, tokens, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    patched = run_patched(model, prefix, plan, clean.acts.clone())
    assert clean.final_resid is not None
    kl = kl_orig_to_patched(
        logits_from_final_resid(model, clean.final_resid),
        logits_from_final_resid(model, patched.final_resid),
    )
    assert kl.item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_the_replacement_only(model: HookedTransformer) -> None:
    tokens = random_tokens()
    plan = plan_splice(model, "blocks.1.hook_resid_pre", None)
    prefix = run_prefix(model, tokens, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    replacement = clean.acts.clone().requires_grad_(True)
    for p in model.parameters():
        p.requires_grad_(False)
    patched = run_patched(model, prefix, plan, replacement)
    patched.final_resid.sum().backward()
    assert replacement.grad is not None and replacement.grad.abs().sum() > 0
    assert prefix.residual is not None and not prefix.residual.requires_grad


def test_hooks_are_removed_even_after_an_exception(model: HookedTransformer) -> None:
    plan = plan_splice(model, "blocks.1.hook_resid_pre", None)
    prefix = run_prefix(model, random_tokens(), plan.start_layer)
    with pytest.raises(RuntimeError):
        run_patched(model, prefix, plan, torch.zeros(1, 2, 3))  # wrong size: reshape fails
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_default_downstream_hooks_are_every_later_resid_post(model: HookedTransformer) -> None:
    plan = plan_splice(model, "blocks.1.hook_resid_pre", None)
    assert plan.downstream_hooks == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    plan = plan_splice(model, "blocks.1.hook_resid_post", None)
    assert plan.downstream_hooks == ("blocks.2.hook_resid_post",)
    assert plan_splice(model, "blocks.2.hook_resid_post", None).downstream_hooks == ()


def test_unknown_hook_suggests_close_names(model: HookedTransformer) -> None:
    with pytest.raises(
        ValueError, match=r"hook_name='blocks\.1\.hook_resid_per'.*blocks\.1\.hook_resid_pre"
    ):
        plan_splice(model, "blocks.1.hook_resid_per", None)


def test_width_mismatch_names_both_widths(model: HookedTransformer) -> None:
    with pytest.raises(ValueError, match=rf"sae\.d_in is 12.*width {D_MODEL}"):
        plan_splice(model, "blocks.1.hook_resid_pre", None, d_in=12)


def test_downstream_hook_before_the_sae_is_refused(model: HookedTransformer) -> None:
    with pytest.raises(ValueError, match="runs at or before"):
        plan_splice(model, "blocks.1.hook_resid_pre", ["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="runs at or before"):
        plan_splice(model, "blocks.1.hook_resid_pre", ["blocks.1.hook_resid_pre"])
    with pytest.raises(ValueError, match="downstream_hooks='blocks.9.hook_resid_post'"):
        plan_splice(model, "blocks.1.hook_resid_pre", ["blocks.9.hook_resid_post"])


def test_rotary_model_with_shared_prefix_matches_full_rerun() -> None:
    model = tiny_model(positional_embedding_type="rotary", normalization_type="RMS")
    tokens = random_tokens()
    plan = plan_splice(model, "blocks.2.hook_resid_pre", None)
    prefix = run_prefix(model, tokens, plan.start_layer)
    replacement = torch.randn(3, 7, D_MODEL)
    ours = logits_from_final_resid(model, run_patched(model, prefix, plan, replacement).final_resid)
    expected = model.run_with_hooks(
        tokens, fwd_hooks=[("blocks.2.hook_resid_pre", lambda a, hook: replacement)]
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "hook_name",
    [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_mid",
        "blocks.1.attn.hook_z",
        "blocks.2.hook_resid_post",
        "hook_embed",
    ],
)
@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_checkpointed_blocks_give_the_same_outputs_and_gradient(
    hook_name: str, positional: str
) -> None:
    model = tiny_model(positional_embedding_type=positional)
    tokens = random_tokens(seed=3)
    plan = plan_splice(model, hook_name, None)
    prefix = run_prefix(model, tokens, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    noise = torch.randn_like(clean.acts, generator=torch.Generator().manual_seed(4))
    results = []
    for checkpointed in (False, True):
        replacement = (clean.acts + 0.5 * noise).requires_grad_(True)
        patched = run_patched(model, prefix, plan, replacement, checkpoint_blocks=checkpointed)
        logits = logits_from_final_resid(model, patched.final_resid)
        loss = kl_orig_to_patched(logits_from_final_resid(model, clean.final_resid), logits)
        loss = loss + sum(
            ((patched.downstream[n] - clean.downstream[n]) ** 2).mean()
            for n in plan.downstream_hooks
        )
        loss.backward()
        results.append((loss.detach(), patched.downstream, replacement.grad))
    (plain_loss, plain_down, plain_grad), (ckpt_loss, ckpt_down, ckpt_grad) = results
    assert plain_loss > 1e-3 and plain_grad is not None and ckpt_grad is not None
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=0)
    assert ckpt_down.keys() == plain_down.keys() and len(plain_down) == len(plan.downstream_hooks)
    for name in plain_down:
        torch.testing.assert_close(ckpt_down[name].detach(), plain_down[name].detach())
    torch.testing.assert_close(ckpt_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_checkpointing_keeps_fewer_tensors_for_backward() -> None:
    model = tiny_model()
    plan = plan_splice(model, "blocks.0.hook_resid_pre", None)
    prefix = run_prefix(model, random_tokens(), plan.start_layer)
    replacement = prefix.residual.clone().requires_grad_(True)  # type: ignore[union-attr]
    saved = []
    for checkpointed in (False, True):
        count = [0]

        def pack(t: torch.Tensor, count: list[int] = count) -> torch.Tensor:
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run_patched(model, prefix, plan, replacement, checkpoint_blocks=checkpointed)
        saved.append(count[0])
    plain, checkpointed_count = saved
    assert checkpointed_count < plain / 3
