"""``sae_e2e_plugin.features``: the bounded-memory statistics, logit tables, ablation effects
and decoder-cosine matches, each against a brute-force computation on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from features_common import (
    D_SAE,
    all_feature_acts,
    brute_logits,
    brute_nearest,
    hand_ablation_kl,
    random_sae,
    tokens,
)

from sae_e2e_plugin.features import ablation
from sae_e2e_plugin.features.compare import nearest_by_cosine
from sae_e2e_plugin.features.logits import logit_effects, model_unembedding
from sae_e2e_plugin.features.options import InspectOptions, select_features
from sae_e2e_plugin.features.passes import (
    WindowRequest,
    collect_stats,
    plan_dictionary,
    window_of,
)
from sae_e2e_plugin.features.stats import HIST_BINS, FeatureStats


def run_stats(model, sae, toks, top_k=5, n_samples=6, batch_size=5, flush_at=None) -> FeatureStats:
    stats = FeatureStats(
        D_SAE, top_k, n_samples, seed=1, context_size=toks.shape[1], before=2, after=1
    )
    if flush_at is not None:  # merge held-back entries every few, mid-batch too
        stats.top.flush_at = stats.samples.flush_at = flush_at
    # 5 sequences per batch: the last batch is shorter, and top-k merges across batches.
    collect_stats(model, [plan_dictionary(model, sae)], toks, [stats], batch_size)
    return stats


def test_counts_maxima_histograms_and_l0_equal_brute_force() -> None:
    model, sae, toks = tiny_model(), random_sae(0), tokens()
    stats = run_stats(model, sae, toks)
    acts = all_feature_acts(model, sae, toks)
    firing = acts > 0
    assert stats.n_tokens == toks.numel() == acts.shape[0]
    assert torch.equal(stats.fired, firing.sum(0))
    assert torch.allclose(stats.frequency, firing.double().mean(0))
    assert 0 < int((stats.fired == 0).sum()) < D_SAE  # dead and live features both present
    assert torch.allclose(stats.act_max, acts.max(0).values.clamp(min=0), atol=1e-5)
    assert torch.allclose(stats.act_sum, acts.double().sum(0), rtol=1e-5, atol=1e-4)
    assert torch.equal(stats.l0_counts, torch.bincount(firing.sum(1), minlength=D_SAE + 1))
    for f in range(D_SAE):
        values = acts[firing[:, f], f]
        bins = ((values.log10() + 4.0) / 8.0 * HIST_BINS).floor().clamp(0, HIST_BINS - 1)
        expected = torch.bincount(bins.long(), minlength=HIST_BINS)
        assert torch.equal(stats.histogram[f], expected), f


@pytest.mark.parametrize("flush_at", [None, 7])
def test_top_contexts_equal_brute_force_top_k(flush_at: int | None) -> None:
    model, sae, toks = tiny_model(), random_sae(0), tokens()
    stats = run_stats(model, sae, toks, top_k=5, flush_at=flush_at)
    acts = all_feature_acts(model, sae, toks)
    few = 0
    for f in range(D_SAE):
        positive = acts[:, f][acts[:, f] > 0]
        expected = positive.sort(descending=True).values[:5]
        got = stats.top_examples(f)
        few += 0 < len(positive) < 5
        assert len(got) == len(expected)
        assert torch.allclose(torch.tensor([v for _, v in got]), expected, atol=1e-5)
        for token, value in got:  # each kept token really has that activation
            assert acts[token, f] == pytest.approx(value, abs=1e-5)
    assert few > 0  # features firing fewer than k times are covered


@pytest.mark.parametrize("flush_at", [None, 7])
def test_samples_are_distinct_firing_tokens_with_their_activations(flush_at: int | None) -> None:
    model, sae, toks = tiny_model(), random_sae(0), tokens()
    stats = run_stats(model, sae, toks, n_samples=6, flush_at=flush_at)
    acts = all_feature_acts(model, sae, toks)
    whole, partial = 0, 0
    for f in range(D_SAE):
        firing = set((acts[:, f] > 0).nonzero().flatten().tolist())
        sample = stats.sampled_examples(f)
        picked = [t for t, _ in sample]
        assert len(picked) == len(set(picked)) == min(6, len(firing))
        assert set(picked) <= firing
        for token, value in sample:
            assert acts[token, f] == pytest.approx(value, abs=1e-5)
        whole += 0 < len(firing) <= 6
        partial += len(firing) > 6
    assert whole > 0 and partial > 0


def test_samples_reach_every_part_of_the_pass() -> None:
    # A uniform sample of a frequent feature's tokens is not the first ones seen.
    model, sae, toks = tiny_model(), random_sae(0), tokens(n_rows=40)
    stats = run_stats(model, sae, toks, n_samples=6)
    frequent = int(stats.fired.argmax())
    picked = [t for t, _ in stats.sampled_examples(frequent)]
    assert max(picked) > toks.numel() // 2 and min(picked) < toks.numel() // 2


@pytest.mark.parametrize("flush_at", [None, 7])
def test_windows_hold_the_activations_around_each_example(flush_at: int | None) -> None:
    model, sae, toks = tiny_model(), random_sae(0), tokens()
    stats = run_stats(model, sae, toks, top_k=3, n_samples=3, flush_at=flush_at)
    acts = all_feature_acts(model, sae, toks).reshape(*toks.shape, D_SAE)
    edges = 0
    for f in stats.fired.nonzero().flatten().tolist():
        examples = stats.top_examples(f) + stats.sampled_examples(f)
        for token, _ in examples:
            window = window_of(stats, toks, WindowRequest(f, token))
            seq, pos = divmod(token, toks.shape[1])
            start, stop = max(0, pos - 2), min(toks.shape[1], pos + 2)
            edges += start == 0 or stop == toks.shape[1]
            assert (window.sequence, window.position, window.start) == (seq, pos, start)
            assert list(window.token_ids) == toks[seq, start:stop].tolist()
            assert torch.allclose(torch.tensor(window.acts), acts[seq, start:stop, f])
    assert edges > 0  # windows cut at a sequence's ends are covered


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_logit_table_equals_w_dec_times_w_u(norm: str) -> None:
    model, sae = tiny_model(normalization_type=norm), random_sae(0)
    unembedding = model_unembedding(model)
    assert unembedding is not None
    features = [0, 5, 11]
    effects = logit_effects(sae.W_dec.detach(), features, unembedding, k=4, chunk=2)
    full = brute_logits(model, sae)[features]
    assert torch.allclose(effects.raised, full.topk(4, dim=1).values, atol=1e-5)
    assert torch.allclose(effects.lowered, full.topk(4, dim=1, largest=False).values, atol=1e-5)
    assert torch.allclose(full.gather(1, effects.raised_ids), effects.raised, atol=1e-5)


def test_ablation_effect_equals_a_hand_spliced_kl() -> None:
    model, sae, toks = tiny_model(), random_sae(0), tokens()
    stats = run_stats(model, sae, toks, top_k=3)
    alive = stats.fired.nonzero().flatten().tolist()[:6]
    contexts = [ablation.AblationContext(f, t) for f in alive for t, _ in stats.top_examples(f)]
    kls = ablation.ablation_kls(model, plan_dictionary(model, sae), toks, contexts, batch_size=4)
    hand = [hand_ablation_kl(model, sae, toks, c.feature, c.token) for c in contexts]
    assert torch.allclose(torch.tensor(kls), torch.tensor(hand), rtol=1e-3, atol=1e-6)
    assert max(hand) > 1e-4  # the ablations change the output
    means = ablation.mean_effects(contexts, kls)
    for f in alive:
        own = [kl for c, kl in zip(contexts, kls, strict=True) if c.feature == f]
        assert means[f] == pytest.approx(sum(own) / len(own))


def test_matches_equal_an_independent_cosine_argmax() -> None:
    a, b = random_sae(0), random_sae(1, d_sae=30)
    matches = nearest_by_cosine(a.W_dec.detach(), b.W_dec.detach(), chunk=7)
    index, best = brute_nearest(a, b)
    assert torch.equal(matches.nearest, index)
    assert torch.allclose(matches.cosine, best, atol=1e-6)


def test_selection_by_frequency_and_importance() -> None:
    fired = torch.tensor([0, 5, 9, 0, 2, 9])
    options = InspectOptions(select="frequent", n_features=3)
    assert select_features(options, fired) == [2, 5, 1]
    importance = {1: 0.5, 2: 0.1, 4: 0.9}
    assert select_features(InspectOptions(select="important", n_features=2), fired, importance) == [
        4,
        1,
    ]
    random = select_features(InspectOptions(n_features=3, seed=4), fired)
    assert len(random) == 3 and set(random) <= {1, 2, 4, 5}  # live features only
    assert select_features(InspectOptions(select="ids", feature_ids=(5, 0)), fired) == [0, 5]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"select": "best"}, "select='best'"),
        ({"select": "ids", "feature_ids": (3, D_SAE)}, f"feature_ids [{D_SAE}]"),
        ({"select": "ids"}, "feature_ids"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"ablation_contexts": 30}, "ablation_contexts=30 exceeds top_k=20"),
        ({"no_match_below": 2.0}, "no_match_below"),
    ],
)
def test_bad_options_are_refused_by_name(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        InspectOptions(**fields).check(D_SAE)


def test_a_hugging_face_model_gets_the_same_statistics_and_logit_table() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.norm.weight.uniform_(0.5, 1.5)  # a final-norm weight that matters
    sae, toks = random_sae(0), tokens()
    seen: list[torch.Tensor] = []
    handle = hf.model.layers[1].register_forward_hook(
        lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        hf(toks)
    handle.remove()
    acts = sae.encode(seen[0].reshape(-1, 16)).float()
    stats = FeatureStats(D_SAE, top_k=3, n_samples=2, context_size=toks.shape[1])
    dictionary = plan_dictionary(hf, sae, hook_name="model.layers.1")
    collect_stats(hf, [dictionary], toks, [stats], batch_size=7)
    assert torch.equal(stats.fired, (acts > 0).sum(0))
    assert torch.allclose(stats.act_max, acts.max(0).values.clamp(min=0), atol=1e-5)
    unembedding = model_unembedding(hf)
    assert unembedding is not None and not unembedding.centre
    full = sae.W_dec.detach() @ (hf.model.norm.weight.detach()[:, None] * hf.lm_head.weight.T)
    effects = logit_effects(sae.W_dec.detach(), [0, 9], unembedding, k=3)
    assert torch.allclose(effects.raised, full[[0, 9]].topk(3, dim=1).values, atol=1e-5)
    f = int(stats.fired.argmax())
    contexts = [ablation.AblationContext(f, t) for t, _ in stats.top_examples(f)]
    kls = ablation.ablation_kls(hf, dictionary, toks, contexts, batch_size=2)
    assert max(kls) > 1e-6
    for context, kl in zip(contexts, kls, strict=True):
        seq, pos = divmod(context.token, toks.shape[1])
        row = toks[seq : seq + 1]

        def remove(module, args, out):  # the feature taken out of the layer's output
            hidden = out[0] if isinstance(out, tuple) else out
            own = sae.encode(hidden.reshape(-1, 16))[:, f].reshape(hidden.shape[:2])
            hidden = hidden - own[..., None] * sae.W_dec[f]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        with torch.no_grad():
            clean = hf(row).logits[0, pos]
            handle = hf.model.layers[1].register_forward_hook(remove)
            ablated = hf(row).logits[0, pos]
            handle.remove()
        log_p, log_q = clean.log_softmax(-1), ablated.log_softmax(-1)
        assert kl == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-3, abs=1e-7)


def test_the_l0_histogram_keeps_every_token_in_at_most_64_bars() -> None:
    from sae_e2e_plugin.features.views import l0_histogram

    counts = torch.zeros(5001, dtype=torch.long)
    counts[[7, 8, 4000]] = torch.tensor([3, 4, 5])
    shown = l0_histogram(counts)
    assert len(shown["counts"]) <= 64 and sum(shown["counts"]) == 12
    assert shown["counts"][0] == 7 and shown["counts"][-1] == 5
    assert shown["labels"][0].startswith("L0 7–")
    few = l0_histogram(counts[:10])
    assert few["counts"] == [3, 4] and few["labels"] == ["L0 7", "L0 8"]
