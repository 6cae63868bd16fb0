"""Training transcoders: the local loss against hand computations, SAELens' trainer, round trips."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig, TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from transcoders_common import (
    ARCHITECTURES,
    D_IN,
    D_OUT,
    hand_forward,
    make_transcoder,
    random_transcoder,
    step_input,
)

from sae_e2e_plugin import pack_transcoder_batch
from sae_e2e_plugin.transcoders.registry import register_training_transcoders

ALL = [(arch, skip) for arch in ARCHITECTURES for skip in (False, True)]


@pytest.mark.parametrize(("arch", "skip"), ALL)
def test_local_mse_is_the_hand_computed_error_against_the_target(arch: str, skip: bool) -> None:
    sae = random_transcoder(arch, skip)
    x, y = torch.randn(12, D_IN), torch.randn(12, D_OUT)
    expected_out = hand_forward(sae, x)
    expected_mse = (expected_out - y).pow(2).sum(dim=-1).mean()

    output = sae.training_forward_pass(step_input(sae, x, y))

    torch.testing.assert_close(output.sae_out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.losses["mse_loss"], expected_mse, rtol=1e-5, atol=1e-5)
    # Measured against the target, not the input (the numbers differ by far more than tolerance).
    assert abs(output.losses["mse_loss"].item() - (expected_out - y).pow(2).mean().item()) > 0.1
    torch.testing.assert_close(output.loss, sum(output.losses.values()))
    # SAELens' trainer reads TrainStepOutput.sae_in as what sae_out is measured against.
    assert output.sae_in is not None and torch.equal(output.sae_in, y)


def test_standard_sparsity_term_is_saelens_weighted_l1() -> None:
    sae = random_transcoder("transcoder", True)
    x, y = torch.randn(9, D_IN), torch.randn(9, D_OUT)
    acts = (x @ sae.W_enc + sae.b_enc).relu()
    expected = (0.3 * (acts * sae.W_dec.norm(dim=-1)).sum(dim=-1)).mean()

    output = sae.training_forward_pass(step_input(sae, x, y))

    torch.testing.assert_close(output.losses["l1_loss"], expected)


@pytest.mark.parametrize("arch", ["topk_transcoder", "batchtopk_transcoder"])
def test_topk_auxiliary_loss_reconstructs_the_targets_residual(arch: str) -> None:
    sae = random_transcoder(arch, True)
    x, y = torch.randn(10, D_IN), torch.randn(10, D_OUT)
    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    dead[:7] = True
    output = sae.training_forward_pass(step_input(sae, x, y, dead_neuron_mask=dead))

    pre = (x @ sae.W_enc + sae.b_enc) * sae.W_dec.norm(dim=-1)
    k_aux = min(D_OUT // 2, 7)
    top = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    recons = (aux_acts / sae.W_dec.norm(dim=-1)) @ sae.W_dec
    scale = min(7 / (D_OUT // 2), 1.0)
    expected = scale * (recons - (y - hand_forward(sae, x))).pow(2).sum(dim=-1).mean()
    torch.testing.assert_close(
        output.losses["auxiliary_reconstruction_loss"], expected, rtol=1e-5, atol=1e-5
    )
    assert expected > 0.1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_packed_batch_gives_the_same_step_as_a_target(arch: str) -> None:
    sae = random_transcoder(arch, True)
    x, y = torch.randn(8, D_IN), torch.randn(8, D_OUT)
    with_target = sae.training_forward_pass(step_input(sae, x, y))
    packed = TrainStepInput(
        sae_in=pack_transcoder_batch(x, y),
        coefficients={name: 0.3 for name in sae.get_coefficients()},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    torch.testing.assert_close(sae.training_forward_pass(packed).loss, with_target.loss)


def teacher_batches(seed: int, n: int = 64) -> Any:
    """Endless packed batches [x | mlp(x)] (``x`` drawn from ``seed``) of one fixed random
    two-layer MLP."""
    teacher = torch.Generator().manual_seed(1234)
    w_in = torch.randn(D_IN, 16, generator=teacher)
    w_out = torch.randn(16, D_OUT, generator=teacher) / 4
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(n, D_IN, generator=gen)
        yield pack_transcoder_batch(x, torch.relu(x @ w_in) @ w_out)


def held_out_mse(sae: Any) -> float:
    packed = next(teacher_batches(seed=99, n=512))
    x, y = packed.split([D_IN, D_OUT], dim=-1)
    sae.eval()
    with torch.no_grad():
        return (sae(x) - y).pow(2).sum(dim=-1).mean().item()


def trainer_cfg(**fields: Any) -> SAETrainerConfig:
    """60 steps of 64 rows at a constant lr of 1e-2 (``lr_end`` is normally set by the runner)."""
    defaults = dict(total_training_samples=64 * 60, train_batch_size_samples=64, lr=1e-2)
    return SAETrainerConfig(**(defaults | {"lr_end": 1e-2} | fields))


@pytest.mark.parametrize(("arch", "skip"), ALL)
def test_saelens_trainer_trains_a_transcoder_on_packed_batches(arch: str, skip: bool) -> None:
    torch.manual_seed(0)
    sparsity = {"l1_coefficient": 1e-3} if arch == "transcoder" else {}
    if arch == "jumprelu_transcoder":
        sparsity = {"l0_coefficient": 1e-3}
    sae = make_transcoder(arch, skip, **sparsity)
    before = held_out_mse(sae)
    trainer = SAETrainer(
        cfg=trainer_cfg(),
        sae=sae,
        data_provider=teacher_batches(seed=0),
    )
    trainer.fit()
    after = held_out_mse(sae)
    assert trainer.n_training_steps == 60
    assert after < 0.5 * before, (before, after)


def test_saelens_trainer_folds_the_scaling_factor_of_a_packed_batch() -> None:
    torch.manual_seed(0)
    sae = make_transcoder("transcoder", True, normalize_activations="expected_average_only_in")
    trainer = SAETrainer(
        cfg=trainer_cfg(n_batches_for_norm_estimate=4),
        sae=sae,
        data_provider=teacher_batches(seed=0),
    )
    before = held_out_mse(sae)
    trainer.fit()
    # The factor was estimated (not 1) and folded: the transcoder now works on raw activations.
    assert sae.cfg.normalize_activations == "none"
    assert trainer.activation_scaler.scaling_factor is None
    assert held_out_mse(sae) < 0.5 * before


@pytest.mark.parametrize(("arch", "skip"), ALL)
def test_folding_a_scaling_factor_keeps_the_output_on_the_models_scale(
    arch: str, skip: bool
) -> None:
    sae = random_transcoder(arch, skip).eval()
    x, factor = torch.randn(16, D_IN), 2.5
    with torch.no_grad():
        expected = sae(x * factor) / factor
        sae.fold_activation_norm_scaling_factor(factor)
        torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_configs_and_weights_round_trip_by_architecture_name(arch: str, tmp_path: Any) -> None:
    sae = random_transcoder(arch, True)
    cfg_dict = sae.cfg.to_dict()
    assert cfg_dict["architecture"] == arch

    again = TrainingSAEConfig.from_dict(cfg_dict)
    assert type(again) is type(sae.cfg)
    assert again.to_dict() == cfg_dict

    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert type(loaded) is type(sae)
    for name, tensor in sae.state_dict().items():
        # SAELens loads every tensor in cfg.dtype (its batch top-k threshold, kept in float64
        # while training, too).
        torch.testing.assert_close(loaded.state_dict()[name], tensor, check_dtype=False)


def test_registering_again_is_harmless() -> None:
    register_training_transcoders()
    register_training_transcoders()
