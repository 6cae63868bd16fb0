"""The sparse TopK training forward pass against SAELens' dense one and hand-written formulas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import make_cfg, tiny_model, token_dataset
from sae_lens import StandardTrainingSAEConfig, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE
from transcoders_common import make_transcoder

import sae_e2e_plugin.training.loop.step_pass as step_pass
from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.core.sparse_topk import (
    chosen_pre_activations,
    sparse_topk_training_forward,
    sparse_topk_unsupported,
)

D_IN, D_SAE, K, ROWS = 24, 96, 5, 40


def make_sae(seed: int = 0, **fields: Any) -> TopKTrainingSAE:
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **fields))
    with torch.no_grad():  # away from SAELens' init: biases set, decoder rows of unequal norm
        sae.b_dec.normal_()
        sae.b_enc.normal_(0.0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def step_input(dead: torch.Tensor | None, seed: int = 1) -> TrainStepInput:
    sae_in = torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(seed))
    return TrainStepInput(
        sae_in=sae_in,
        dead_neuron_mask=dead,
        coefficients={},
        n_training_steps=0,
        is_logging_step=False,
    )


def outputs_and_grads(sae: TopKTrainingSAE, forward: Any, inputs: TrainStepInput) -> tuple:
    """The output and every parameter's gradient of its loss plus a fixed linear read-out of
    ``sae_out`` (what the e2e objective adds to the local terms)."""
    sae.zero_grad(set_to_none=True)
    output = forward(inputs)
    readout = torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(7))
    (output.loss + (output.sae_out * readout).sum()).backward()
    return output, {name: p.grad.clone() for name, p in sae.named_parameters()}


DEAD = {
    "no dead latents": None,
    "none dead": torch.zeros(D_SAE, dtype=torch.bool),
    "a few dead": torch.arange(D_SAE) % 17 == 0,  # 6 dead: the auxiliary loss is scaled down
    "many dead": torch.arange(D_SAE) % 3 == 0,  # 32 dead: k_aux = d_in // 2 = 12
}


@pytest.mark.parametrize("dead", DEAD.values(), ids=DEAD.keys())
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("b_dec_to_input", [True, False])
def test_sparse_forward_matches_saelens(
    dead: torch.Tensor | None, rescale: bool, b_dec_to_input: bool
) -> None:
    sae = make_sae(rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=b_dec_to_input)
    inputs = step_input(dead)
    dense, dense_grads = outputs_and_grads(sae, sae.training_forward_pass, inputs)
    sparse, sparse_grads = outputs_and_grads(
        sae, lambda x: sparse_topk_training_forward(sae, x), inputs
    )
    # The same pre-activations and top-k choice: these are equal, not close.
    assert torch.equal(sparse.hidden_pre, dense.hidden_pre.detach())
    assert torch.equal(sparse.feature_acts, dense.feature_acts)
    assert sparse.sae_in is inputs.sae_in
    assert sorted(sparse.losses) == sorted(dense.losses)
    if dead is not None and dead.any():
        assert dense.losses["auxiliary_reconstruction_loss"] > 0
    for name in dense.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse.sae_out, dense.sae_out, rtol=1e-5, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-5, atol=1e-5)


def test_the_auxiliary_loss_follows_its_formula() -> None:
    """The top dead latents (k_aux = d_in // 2 of 32 dead) reconstruct the live latents'
    residual, unrectified and decoded through norm-divided decoder rows, scaled by
    min(dead / k_aux, 1); written out here with dense tensors."""
    sae = make_sae()
    dead = DEAD["many dead"]
    output = sparse_topk_training_forward(sae, step_input(dead))
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1)
        hidden = ((step_input(dead).sae_in - sae.b_dec) @ sae.W_enc + sae.b_enc) * norms
        k_aux = D_IN // 2
        masked = torch.where(dead, hidden, torch.full_like(hidden, -torch.inf))
        top = masked.topk(k_aux, dim=-1).indices
        acts = torch.zeros_like(hidden).scatter(-1, top, hidden.gather(-1, top))
        recons = (acts / norms) @ sae.W_dec
        residual = step_input(dead).sae_in - output.sae_out
        expected = min(int(dead.sum()) / k_aux, 1.0) * (recons - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(output.losses["auxiliary_reconstruction_loss"], expected)


def test_chosen_pre_activations_gradient_is_the_dense_expressions() -> None:
    """In float64, against the gradient of ``(x @ w + b).gather(-1, chosen)`` taken densely and
    against finite differences."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = (
        torch.randn(*s, generator=gen, dtype=torch.float64) for s in [(7, 5), (5, 11), (11,)]
    )
    chosen = torch.randn(7, 11, generator=gen).topk(3, dim=-1).indices.sort(dim=-1).values
    inputs = [t.clone().requires_grad_() for t in (x, w, b)]

    def sparse(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        values = (x @ w + b).gather(-1, chosen).detach()
        return chosen_pre_activations(x, w, b, chosen, values)

    assert torch.autograd.gradcheck(sparse, inputs)
    weights = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((sparse(*inputs) * weights).sum(), inputs)
    dense = torch.autograd.grad(
        ((inputs[0] @ inputs[1] + inputs[2]).gather(-1, chosen) * weights).sum(), inputs
    )
    for g, d in zip(got, dense, strict=True):
        torch.testing.assert_close(g, d)


def test_under_autocast_the_losses_stay_within_bf16_rounding_of_saelens() -> None:
    sae = make_sae()
    inputs = step_input(DEAD["a few dead"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense, dense_grads = outputs_and_grads(sae, sae.training_forward_pass, inputs)
        sparse, sparse_grads = outputs_and_grads(
            sae, lambda x: sparse_topk_training_forward(sae, x), inputs
        )
    for name in dense.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], rtol=2e-2, atol=1e-3)
    for name, grad in dense_grads.items():
        assert sparse_grads[name].dtype == grad.dtype == torch.float32
        torch.testing.assert_close(sparse_grads[name], grad, rtol=5e-2, atol=5e-2)


SUBCLASSES = {
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K),
    "abstopk": lambda: sae_lens.AbsTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K),
    "matryoshka": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=K, matryoshka_widths=[32, D_SAE]
    ),
}


@pytest.mark.parametrize("config", SUBCLASSES.values(), ids=SUBCLASSES.keys())
def test_saelens_own_topk_variants_keep_their_forward(config: Any) -> None:
    """Each subclass chooses its latents or its auxiliary loss another way."""
    sae = sae_lens.saes.sae.TrainingSAE.from_dict(config().to_dict())
    assert isinstance(sae, TopKTrainingSAE)
    assert "overrides" in str(sparse_topk_unsupported(sae))


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_an_sae_held_in_another_dtype_trains_in_it(dtype: str) -> None:
    """The sparse CSR product runs in float32 at least (no bf16 kernel on CPUs); the
    gradients come back in the SAE's dtype, within its rounding of SAELens' own."""
    sae = make_sae(dtype=dtype)
    inputs = step_input(DEAD["many dead"])
    dense, dense_grads = outputs_and_grads(sae, sae.training_forward_pass, inputs)
    sparse, sparse_grads = outputs_and_grads(
        sae, lambda x: sparse_topk_training_forward(sae, x), inputs
    )
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == "bfloat16" else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.loss, dense.loss, **tolerance)
    for name, grad in dense_grads.items():
        assert sparse_grads[name].dtype == grad.dtype == getattr(torch, dtype)
        torch.testing.assert_close(sparse_grads[name], grad, **tolerance)


def test_a_topk_transcoder_keeps_its_own_forward() -> None:
    """It measures its output against the MLP's output, not against its input."""
    transcoder = make_transcoder("topk_transcoder", skip=False)
    assert isinstance(transcoder, TopKTrainingSAE)
    assert "overrides training_forward_pass" in str(sparse_topk_unsupported(transcoder))


class _OwnDecode(TopKTrainingSAE):
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return super().decode(feature_acts) * 2


def test_saes_it_cannot_reproduce_keep_saelens_forward() -> None:
    assert sparse_topk_unsupported(make_sae()) is None
    assert (
        sparse_topk_unsupported(make_sae(normalize_activations="expected_average_only_in")) is None
    )
    standard = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    assert "not a TopK SAE" in str(sparse_topk_unsupported(standard))
    own = _OwnDecode(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    assert "overrides decode" in str(sparse_topk_unsupported(own))
    layer_norm = make_sae(normalize_activations="layer_norm")
    assert "layer_norm" in str(sparse_topk_unsupported(layer_norm))
    elsewhere = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, device="meta"))
    assert "'meta'" in str(sparse_topk_unsupported(elsewhere))
    hooked = make_sae()
    hooked.hook_sae_acts_post.add_hook(lambda acts, hook: acts)
    assert "hooks" in str(sparse_topk_unsupported(hooked))
    hooked.reset_hooks()
    assert sparse_topk_unsupported(hooked) is None


@pytest.mark.parametrize("sparse_topk", [True, False])
def test_the_e2e_step_takes_the_sparse_forward_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparse_topk: bool
) -> None:
    calls = []

    def counted(sae: Any, inputs: TrainStepInput) -> Any:
        calls.append(inputs.sae_in.shape)
        return sparse_topk_training_forward(sae, inputs)

    monkeypatch.setattr(step_pass, "sparse_topk_training_forward", counted)
    cfg = make_cfg(
        tmp_path,
        sae_cfg=TopKTrainingSAEConfig(d_in=16, d_sae=32, k=3),
        training_tokens=2 * 4 * 8,
        sparse_topk=sparse_topk,
        n_checkpoints=0,
        n_eval_batches=0,
    )
    E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset()).run()
    assert calls == ([torch.Size([32, 16])] * 2 if sparse_topk else [])
