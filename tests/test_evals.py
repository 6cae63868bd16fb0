"""``evaluate_sae`` against hand computations with plain TransformerLens calls (no splice.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, D_MODEL, VOCAB, tiny_model, token_dataset
from sae_lens import (
    StandardSAE,
    StandardSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.evals import get_recons_loss
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer

from sae_e2e_plugin.evaluation.evaluate import evaluate_sae
from sae_e2e_plugin.evaluation.metrics import DEFAULT_ALIVE_WINDOW_TOKENS, EvalResult

HOOK = "blocks.1.hook_resid_pre"
LATER = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
D_SAE = 32
N_DEAD = 5


def random_sae(seed: int = 0, d_sae: int = D_SAE, hook: str = HOOK) -> StandardSAE:
    """A StandardSAE with random non-zero weights; features 0..N_DEAD-1 can never fire."""
    cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=d_sae,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=hook),
    )
    sae = StandardSAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, d_sae, generator=gen) * 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.5)
        sae.b_enc[:N_DEAD] = -1e4
        sae.W_dec.copy_(torch.randn(d_sae, D_MODEL, generator=gen) * 0.3)
        sae.b_dec.copy_(torch.randn(D_MODEL, generator=gen) * 0.1)
    return sae


def perfect_sae(hook: str = HOOK, **cfg: Any) -> StandardSAE:
    """d_sae = 2·d_in, W_enc = [I, −I], W_dec = [I; −I]: relu(x) − relu(−x) = x exactly."""
    sae_cfg = StandardSAEConfig(
        d_in=D_MODEL,
        d_sae=2 * D_MODEL,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=hook),
        **cfg,
    )
    sae = StandardSAE(sae_cfg)
    eye = torch.eye(D_MODEL)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def tokens(n_rows: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.tensor(token_dataset(n_rows=n_rows, seed=seed)["tokens"])


# ---- the hand computation ---------------------------------------------------------------


def _capture(act: torch.Tensor, hook: Any, store: dict[str, torch.Tensor]) -> None:
    store[hook.name] = act.detach().clone()


def _set(act: torch.Tensor, hook: Any, value: torch.Tensor) -> torch.Tensor:
    return value


@torch.no_grad()
def hand_batch(model: HookedTransformer, sae: StandardSAE, toks: torch.Tensor) -> dict[str, Any]:
    """Every per-token quantity of one batch, from full runs of the model."""
    clean: dict[str, torch.Tensor] = {}
    logits_clean = model.run_with_hooks(
        toks, fwd_hooks=[(name, partial(_capture, store=clean)) for name in [HOOK, *LATER]]
    )
    a = clean[HOOK]  # [batch, pos, d_model]
    feats = torch.relu(a @ sae.W_enc + sae.b_enc)  # apply_b_dec_to_input=False
    recon = feats @ sae.W_dec + sae.b_dec
    patched: dict[str, torch.Tensor] = {}
    logits_spliced = model.run_with_hooks(
        toks,
        fwd_hooks=[(HOOK, partial(_set, value=recon))]
        + [(name, partial(_capture, store=patched)) for name in LATER],
    )
    logits_ablated = model.run_with_hooks(
        toks, fwd_hooks=[(HOOK, partial(_set, value=torch.zeros_like(a)))]
    )
    return dict(
        tokens=toks,
        a=a,
        feats=feats,
        recon=recon,
        clean=clean,
        patched=patched,
        logits_clean=logits_clean,
        logits_spliced=logits_spliced,
        logits_ablated=logits_ablated,
    )


def cat(parts: list[dict[str, Any]], key: str) -> torch.Tensor:
    return torch.cat([p[key] for p in parts])


def ce(logits: torch.Tensor, toks: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), toks[:, 1:].reshape(-1)).item()


def kl(orig: torch.Tensor, new: torch.Tensor) -> float:
    return F.kl_div(
        F.log_softmax(new.reshape(-1, VOCAB), -1),
        F.log_softmax(orig.reshape(-1, VOCAB), -1),
        log_target=True,
        reduction="batchmean",
    ).item()


def ev_per_token(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    flat = target.reshape(-1, target.shape[-1])
    total = (target - flat.mean(0)).pow(2).sum(-1)
    return 1 - (pred - target).pow(2).sum(-1) / total


def hand_metrics(parts: list[dict[str, Any]], alive_window: int | None = None) -> dict[str, Any]:
    """Aggregate over batches; EV uses each batch's own mean (as the reference does)."""
    toks = cat(parts, "tokens")
    ce_clean = ce(cat(parts, "logits_clean"), toks)
    ce_spliced = ce(cat(parts, "logits_spliced"), toks)
    ce_ablated = ce(cat(parts, "logits_ablated"), toks)
    kl_spliced = kl(cat(parts, "logits_clean"), cat(parts, "logits_spliced"))
    kl_ablated = kl(cat(parts, "logits_clean"), cat(parts, "logits_ablated"))
    feats = cat(parts, "feats").reshape(-1, D_SAE)
    window = feats if alive_window is None else feats[:alive_window]
    out = dict(
        ce_loss_clean=ce_clean,
        ce_loss_spliced=ce_spliced,
        ce_loss_increase=ce_spliced - ce_clean,
        ce_loss_zero_ablation=ce_ablated,
        ce_loss_score=(ce_ablated - ce_spliced) / (ce_ablated - ce_clean),
        kl_orig_patched=kl_spliced,
        kl_orig_ablated=kl_ablated,
        kl_score=1 - kl_spliced / kl_ablated,
        l0=(feats > 0).float().sum(-1).mean().item(),
        alive_features=int((window > 0).any(0).sum()),
        alive_tokens=window.shape[0],
        explained_variance=torch.cat([ev_per_token(p["recon"], p["a"]).flatten() for p in parts])
        .mean()
        .item(),
        explained_variance_reference=torch.cat(
            [ev_per_token(p["a"], p["recon"]).flatten() for p in parts]
        )
        .mean()
        .item(),
    )
    for name in LATER:
        clean = torch.cat([p["clean"][name] for p in parts])
        patched = torch.cat([p["patched"][name] for p in parts])
        out[f"{name}/mse"] = F.mse_loss(patched, clean).item()
        out[f"{name}/ev"] = (
            torch.cat([ev_per_token(p["patched"][name], p["clean"][name]).flatten() for p in parts])
            .mean()
            .item()
        )
    return out


def assert_matches(result: EvalResult, expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if "/" in key:
            hook, metric = key.split("/")
            got = result.downstream[hook]
            actual = got.mse if metric == "mse" else got.explained_variance
        else:
            actual = getattr(result, key)
        if isinstance(value, int):
            assert actual == value, key
        else:
            assert actual == pytest.approx(value, rel=1e-4, abs=1e-5), key


# ---- tests -------------------------------------------------------------------------------


def test_single_batch_matches_hand_computation(model: HookedTransformer) -> None:
    sae, toks = random_sae(), tokens()
    result = evaluate_sae(sae, model, toks)
    expected = hand_metrics([hand_batch(model, sae, toks)])
    assert_matches(result, expected)
    # The random SAE is non-trivial: some features fire, the 5 blocked ones never do.
    assert 1 < result.l0 < D_SAE - N_DEAD
    assert result.alive_features == D_SAE - N_DEAD
    assert result.alive_fraction == pytest.approx((D_SAE - N_DEAD) / D_SAE)
    assert result.kl_orig_patched > 0.01 and result.ce_loss_increase != 0
    assert result.n_tokens == toks.numel() and result.n_sequences == toks.shape[0]
    assert result.alive_tokens == toks.numel()
    assert list(result.downstream) == LATER  # default: every later hook_resid_post, in order


def test_multi_batch_aggregate_equals_concatenated_hand_computation(
    model: HookedTransformer,
) -> None:
    sae = random_sae(seed=3)
    batches = [tokens(5, seed=2), tokens(8, seed=3), tokens(3, seed=4)]
    alive_window = 50  # cuts the second batch in the middle
    result = evaluate_sae(
        sae, model, iter(batches), alive_window_tokens=alive_window, logits_chunk_size=7
    )
    expected = hand_metrics([hand_batch(model, sae, b) for b in batches], alive_window)
    assert_matches(result, expected)
    assert result.alive_tokens == alive_window
    assert result.n_tokens == 16 * CONTEXT


def test_alive_counts_only_features_that_fire_in_the_window(model: HookedTransformer) -> None:
    sae = random_sae(seed=5)
    with torch.no_grad():
        sae.b_enc[N_DEAD : 2 * N_DEAD] = -1e4  # five more dead features
    result = evaluate_sae(sae, model, tokens())
    assert result.alive_features == D_SAE - 2 * N_DEAD
    everything = evaluate_sae(sae, model, tokens(), alive_window_tokens=None)
    assert everything.alive_tokens == everything.n_tokens
    one_token = evaluate_sae(sae, model, tokens(), alive_window_tokens=1)
    first = hand_batch(model, sae, tokens())["feats"][0, 0]
    assert one_token.alive_features == int((first != 0).sum())
    assert one_token.alive_tokens == 1


def test_perfect_reconstruction(model: HookedTransformer) -> None:
    result = evaluate_sae(perfect_sae(), model, tokens().split(4))
    assert result.kl_orig_patched == pytest.approx(0.0, abs=1e-5)
    assert result.ce_loss_increase == pytest.approx(0.0, abs=1e-5)
    assert result.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert result.explained_variance_reference == pytest.approx(1.0, abs=1e-5)
    assert result.ce_loss_score == pytest.approx(1.0, abs=1e-4)
    assert result.kl_score == pytest.approx(1.0, abs=1e-5)
    assert abs(result.ce_loss_zero_ablation - result.ce_loss_clean) > 0.1
    for metrics in result.downstream.values():
        assert metrics.mse == pytest.approx(0.0, abs=1e-8)
        assert metrics.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert result.l0 == pytest.approx(D_MODEL, abs=0.1)  # one of ±x_i per dimension


def test_scores_agree_with_saelens_get_recons_loss(model: HookedTransformer) -> None:
    sae, toks = random_sae(seed=7), tokens()
    ours = evaluate_sae(sae, model, toks)
    theirs = get_recons_loss(
        sae, model, ActivationScaler(), toks, compute_kl=True, compute_ce_loss=True
    )
    mean = {name: value.mean().item() for name, value in theirs.items()}
    assert ours.ce_loss_clean == pytest.approx(mean["ce_loss_without_sae"], rel=1e-4)
    assert ours.ce_loss_spliced == pytest.approx(mean["ce_loss_with_sae"], rel=1e-4)
    assert ours.ce_loss_zero_ablation == pytest.approx(mean["ce_loss_with_ablation"], rel=1e-4)
    assert ours.kl_orig_patched == pytest.approx(mean["kl_div_with_sae"], rel=1e-4)
    assert ours.kl_orig_ablated == pytest.approx(mean["kl_div_with_ablation"], rel=1e-4)


def test_hook_z_sae_reads_heads_flattened(model: HookedTransformer) -> None:
    hook = "blocks.1.attn.hook_z"  # [batch, pos, 2 heads, 8] read as [batch, pos, 16]
    toks = tokens()
    inference = perfect_sae(hook, reshape_activations="hook_z")
    assert inference.hook_z_reshaping_mode
    result = evaluate_sae(inference, model, toks, downstream_hooks=())
    assert result.kl_orig_patched == pytest.approx(0.0, abs=1e-5)
    assert result.downstream == {}

    random = random_sae(seed=9, hook=hook)
    training = StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=D_MODEL,
            d_sae=D_SAE,
            apply_b_dec_to_input=False,
            metadata=SAEMetadata(hook_name=hook),
        )
    )  # hook_z reshaping is off in training SAEs: they read the flattened layout
    training.load_state_dict(random.state_dict())
    hooked = StandardSAE(
        StandardSAEConfig(
            d_in=D_MODEL,
            d_sae=D_SAE,
            apply_b_dec_to_input=False,
            reshape_activations="hook_z",
            metadata=SAEMetadata(hook_name=hook),
        )
    )
    hooked.load_state_dict(random.state_dict())
    flat, heads = evaluate_sae(training, model, toks), evaluate_sae(hooked, model, toks)
    assert flat.ce_loss_spliced == pytest.approx(heads.ce_loss_spliced, rel=1e-5)
    assert flat.explained_variance == pytest.approx(heads.explained_variance, rel=1e-5)

    # By hand: splice the decoded flat vector back in as heads.
    clean: dict[str, torch.Tensor] = {}
    model.run_with_hooks(toks, fwd_hooks=[(hook, partial(_capture, store=clean))])
    z = clean[hook]
    with torch.no_grad():
        recon = (
            torch.relu(z.flatten(2) @ random.W_enc + random.b_enc) @ random.W_dec + random.b_dec
        ).reshape(z.shape)
        logits = model.run_with_hooks(toks, fwd_hooks=[(hook, partial(_set, value=recon))])
    assert flat.ce_loss_spliced == pytest.approx(ce(logits, toks), rel=1e-4)


def test_training_sae_topk_sparse_and_modes_restored(model: HookedTransformer) -> None:
    cfg = dict(d_in=D_MODEL, d_sae=D_SAE, k=4, metadata=SAEMetadata(hook_name=HOOK))
    sparse = TopKTrainingSAE(TopKTrainingSAEConfig(use_sparse_activations=True, **cfg))
    dense = TopKTrainingSAE(TopKTrainingSAEConfig(use_sparse_activations=False, **cfg))
    dense.load_state_dict(sparse.state_dict())
    sparse.train()
    model.train()
    a = evaluate_sae(sparse, model, tokens())
    assert sparse.training and model.training
    b = evaluate_sae(dense.eval(), model.eval(), tokens())
    assert not dense.training and not model.training
    assert 0 < a.l0 <= 4
    assert a.l0 == pytest.approx(b.l0)
    assert a.kl_orig_patched == pytest.approx(b.kl_orig_patched, rel=1e-5)


def test_to_dict_json_round_trip_and_save(model: HookedTransformer, tmp_path: Any) -> None:
    result = evaluate_sae(random_sae(), model, tokens())
    flat = result.to_dict()
    assert flat["ce_loss_increase"] == result.ce_loss_increase
    assert flat["downstream/blocks.2.hook_resid_post/mse"] == result.downstream[LATER[1]].mse
    assert flat["downstream/blocks.1.hook_resid_post/explained_variance"] == (
        result.downstream[LATER[0]].explained_variance
    )
    assert all(isinstance(v, (int, float, str)) for v in flat.values())
    assert json.loads(json.dumps(flat)) == flat
    assert EvalResult.from_dict(json.loads(json.dumps(flat))) == result
    path = result.save_json(tmp_path / "sub" / "eval.json")
    assert json.loads(path.read_text()) == flat


def test_to_dict_maps_non_finite_to_none() -> None:
    result = EvalResult(
        hook_name=HOOK,
        n_tokens=8,
        n_sequences=1,
        n_spliced=8,
        ce_loss_clean=1.0,
        ce_loss_spliced=1.0,
        ce_loss_increase=0.0,
        ce_loss_zero_ablation=1.0,
        ce_loss_score=math.nan,
        kl_orig_patched=0.0,
        kl_orig_ablated=0.0,
        kl_score=math.nan,
        l0=1.0,
        d_sae=2,
        alive_features=1,
        alive_fraction=0.5,
        alive_tokens=8,
        explained_variance=1.0,
        explained_variance_reference=1.0,
        downstream={},
    )
    flat = result.to_dict()
    assert flat["ce_loss_score"] is None and flat["kl_score"] is None
    assert math.isnan(EvalResult.from_dict(json.loads(json.dumps(flat))).ce_loss_score)


def test_format_table_contains_key_numbers(model: HookedTransformer) -> None:
    result = evaluate_sae(random_sae(), model, tokens())
    table = result.format_table()
    for value in (
        result.ce_loss_increase,
        result.kl_orig_patched,
        result.l0,
        result.explained_variance,
        result.ce_loss_score,
        result.kl_score,
        result.downstream[LATER[1]].mse,
    ):
        assert f"{value:.4f}" in table
    # The reference-formula EV is kept for JSON but not shown (it misleads at a glance).
    assert "reference" not in table
    assert f"{result.alive_features}" in table and HOOK in table and LATER[1] in table


def test_token_batch_forms(model: HookedTransformer) -> None:
    sae, toks = random_sae(), tokens()
    single = evaluate_sae(sae, model, toks)
    listed = evaluate_sae(sae, model, [toks])

    def endless() -> Iterator[torch.Tensor]:
        while True:
            yield toks

    limited = evaluate_sae(sae, model, endless(), max_batches=1)
    assert single == listed == limited


def test_errors_name_the_problem(model: HookedTransformer) -> None:
    sae = random_sae()
    with pytest.raises(ValueError, match="yielded no batch"):
        evaluate_sae(sae, model, [])
    with pytest.raises(ValueError, match=r"shape \(batch, pos\)"):
        evaluate_sae(sae, model, tokens()[0])
    with pytest.raises(ValueError, match="pos >= 2"):
        evaluate_sae(sae, model, tokens()[:, :1])
    with pytest.raises(ValueError, match="integer"):
        evaluate_sae(sae, model, tokens().float())
    no_hook = StandardSAE(StandardSAEConfig(d_in=D_MODEL, d_sae=D_SAE))
    with pytest.raises(ValueError, match="hook_name"):
        evaluate_sae(no_hook, model, tokens())
    with pytest.raises(ValueError, match="not a hook point"):
        evaluate_sae(sae, model, tokens(), hook_name="blocks.1.hook_resid_prex")
    scaled = StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=D_MODEL,
            d_sae=D_SAE,
            normalize_activations="expected_average_only_in",
            metadata=SAEMetadata(hook_name=HOOK),
        )
    )
    with pytest.raises(ValueError, match="activation_scaler"):
        evaluate_sae(scaled, model, tokens())


def test_activation_scaler_is_applied_and_undone(model: HookedTransformer) -> None:
    # A perfect SAE stays perfect when inputs are scaled by the trainer's factor and unscaled.
    scaled = perfect_sae(normalize_activations="expected_average_only_in")
    result = evaluate_sae(scaled, model, tokens(), activation_scaler=ActivationScaler(3.0))
    assert result.kl_orig_patched == pytest.approx(0.0, abs=1e-5)
    assert result.explained_variance == pytest.approx(1.0, abs=1e-5)


def test_default_alive_window_is_the_papers() -> None:
    assert DEFAULT_ALIVE_WINDOW_TOKENS == 500_000


def test_hook_without_shared_prefix(model: HookedTransformer) -> None:
    # hook_embed is outside the blocks: every run restarts from the tokens.
    result = evaluate_sae(perfect_sae("hook_embed"), model, tokens())
    assert result.kl_orig_patched == pytest.approx(0.0, abs=1e-5)
    assert len(result.downstream) == tiny_model().cfg.n_layers


def test_bf16_model_with_float32_sae() -> None:
    model = tiny_model(dtype=torch.bfloat16)
    result = evaluate_sae(perfect_sae(), model, tokens())
    assert result.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert result.kl_orig_patched == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(result.ce_loss_clean) and result.kl_orig_ablated > 0.1
