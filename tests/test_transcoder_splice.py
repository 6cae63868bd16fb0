"""Exports spliced into a model by plain SAELens' ``HookedSAETransformer.add_sae``.

``add_sae`` reads ``metadata.hook_name`` / ``hook_name_out``: it captures the MLP's input and
replaces the MLP's output. It runs the transcoder as ``decode(encode(x))``, not ``forward``, so
in sae-lens 6.54.12 a skip transcoder's ``x @ W_skip.T`` is left out of the splice; the second
test pins that, so a SAELens release that changes it is noticed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer
from transcoders_common import ARCHITECTURES, random_transcoder
from transformer_lens import HookedTransformerConfig

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
D_MODEL = 16


def tiny_model() -> HookedSAETransformer:
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=40,
        n_ctx=16,
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
        device="cpu",
    )
    return HookedSAETransformer(cfg).eval()


def exported(arch: str, skip: bool, folder: Any) -> SAE[Any]:
    sae = random_transcoder(arch, skip, d_in=D_MODEL, d_out=D_MODEL, d_sae=32)
    with torch.no_grad():
        sae.W_dec.mul_(0.1)  # MLP-output-sized writes, so the logits stay finite and sensitive
    sae.save_inference_model(folder, hook_name=HOOK_IN, hook_name_out=HOOK_OUT)
    return SAE.load_from_disk(folder)


def logits_with_mlp_replaced(
    model: HookedSAETransformer, tokens: torch.Tensor, replace: Any
) -> torch.Tensor:
    """The model's logits with ``HOOK_OUT`` replaced by ``replace(input captured at HOOK_IN)``."""
    captured: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor, hook: Any) -> None:
        captured["x"] = act

    def swap(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return replace(captured["x"])

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(HOOK_IN, capture), (HOOK_OUT, swap)])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_add_sae_replaces_the_mlp_output_with_the_transcoders(arch: str, tmp_path: Any) -> None:
    model, tokens = tiny_model(), torch.randint(0, 40, (2, 8))
    sae = exported(arch, False, tmp_path)
    expected = logits_with_mlp_replaced(model, tokens, sae)
    clean = model(tokens)
    model.add_sae(sae)
    with torch.no_grad():
        spliced = model(tokens)
    torch.testing.assert_close(spliced, expected, rtol=1e-4, atol=1e-4)
    assert (spliced - clean).abs().max() > 1e-2  # the splice changed the logits


def test_add_sae_leaves_a_skip_transcoders_skip_term_out(tmp_path: Any) -> None:
    model, tokens = tiny_model(), torch.randint(0, 40, (2, 8))
    sae = exported("transcoder", True, tmp_path)
    full = logits_with_mlp_replaced(model, tokens, sae)
    without_skip = logits_with_mlp_replaced(model, tokens, lambda x: sae.decode(sae.encode(x)))
    model.add_sae(sae)
    with torch.no_grad():
        spliced = model(tokens)
    torch.testing.assert_close(spliced, without_skip, rtol=1e-4, atol=1e-4)
    assert (spliced - full).abs().max() > 1e-2
