"""Tiny models and SAEs for the ``sae-e2e inspect`` tests, and brute-force references that
hold every activation at once (what the package itself never does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import D_MODEL, VOCAB, token_dataset
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer

HOOK = "blocks.1.hook_resid_pre"
D_SAE = 48


def random_sae(seed: int, d_sae: int = D_SAE) -> StandardSAE:
    """A StandardSAE with random weights whose features fire on some tokens and not others."""
    cfg = StandardSAEConfig(
        d_in=D_MODEL, d_sae=d_sae, apply_b_dec_to_input=False, metadata=SAEMetadata(hook_name=HOOK)
    )
    sae = StandardSAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, d_sae, generator=gen) * 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, D_MODEL, generator=gen) * 0.3)
        # Varied thresholds: frequent, rare and never-firing features.
        sae.b_enc.copy_(torch.linspace(0.5, -6.0, d_sae))
        sae.b_dec.zero_()
    return sae.eval()


def tokens(n_rows: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.tensor(token_dataset(n_rows, seed=seed)["tokens"], dtype=torch.long)


@torch.no_grad()
def all_feature_acts(
    model: HookedTransformer, sae: StandardSAE, toks: torch.Tensor
) -> torch.Tensor:
    """[tokens, d_sae] every activation, from the model's full forward pass with a cache."""
    _, cache = model.run_with_cache(toks, names_filter=HOOK)
    return sae.encode(cache[HOOK].reshape(-1, D_MODEL)).float()


@torch.no_grad()
def hand_ablation_kl(
    model: HookedTransformer, sae: StandardSAE, toks: torch.Tensor, feature: int, token: int
) -> float:
    """KL(clean ‖ ablated) at flat ``token``: the whole sequence run twice through the model's
    own forward, the feature's activation × decoder row subtracted by a plain hook."""
    context = toks.shape[1]
    sequence, position = divmod(token, context)
    row = toks[sequence : sequence + 1]

    def remove(act: torch.Tensor, hook: object) -> torch.Tensor:
        own = sae.encode(act.reshape(-1, D_MODEL))[:, feature].reshape(act.shape[:2])
        return act - own[..., None] * sae.W_dec[feature]

    clean = model(row)[0, position]
    ablated = model.run_with_hooks(row, fwd_hooks=[(HOOK, remove)])[0, position]
    log_p, log_q = F.log_softmax(clean, -1), F.log_softmax(ablated, -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


def brute_logits(model: HookedTransformer, sae: StandardSAE) -> torch.Tensor:
    """[d_sae, vocab] W_dec @ W_U with the final LayerNorm's weight folded into W_U and the
    direction centred (a LayerNorm), as docs/inspect.md states."""
    w_dec = sae.W_dec.detach()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        w_dec = w_dec - w_dec.mean(1, keepdim=True)
    w_u = model.unembed.W_U.detach()
    if hasattr(model.ln_final, "w"):
        w_u = model.ln_final.w.detach()[:, None] * w_u
    assert w_u.shape[1] == VOCAB
    return w_dec @ w_u


def brute_nearest(a: StandardSAE, b: StandardSAE) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decoder row of ``a``: the index and cosine of the nearest row of ``b``."""
    similarity = F.cosine_similarity(
        a.W_dec.detach()[:, None, :], b.W_dec.detach()[None, :, :], dim=-1
    )
    best, index = similarity.max(dim=1)
    return index, best
