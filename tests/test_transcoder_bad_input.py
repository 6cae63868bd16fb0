"""Bad transcoder input is refused by name: the field, the value and the fix are in the message."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepInput
from transcoders_common import ARCHITECTURES, D_IN, D_OUT, make_transcoder, step_input

from sae_e2e_plugin import StandardTrainingTranscoderConfig, TopKTrainingTranscoderConfig


@pytest.mark.parametrize("d_out", [0, -3, 2.5, True])
def test_d_out_must_be_a_positive_whole_number(d_out: Any) -> None:
    with pytest.raises(ValueError, match=rf"d_out must be a whole number >= 1, got {d_out!r}"):
        StandardTrainingTranscoderConfig(d_in=4, d_sae=8, d_out=d_out)


def test_d_out_is_required() -> None:
    with pytest.raises(TypeError, match="d_out"):
        StandardTrainingTranscoderConfig(d_in=4, d_sae=8)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_sae": 0}, r"d_sae must be a whole number >= 1, got 0"),
        (
            {"apply_b_dec_to_input": True},
            r"apply_b_dec_to_input=True .* set apply_b_dec_to_input=False",
        ),
        (
            {"normalize_activations": "layer_norm"},
            r"normalize_activations='layer_norm' .* Use one of",
        ),
        ({"reshape_activations": "hook_z"}, r"reshape_activations='hook_z' .* use 'none'"),
        ({"skip_connection": "yes"}, r"skip_connection must be True or False, got 'yes'"),
    ],
)
def test_config_fields_are_checked_by_name(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StandardTrainingTranscoderConfig(**({"d_in": 4, "d_sae": 8, "d_out": 3} | fields))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"k": 9}, r"k must be > 0 and at most d_sae=8, got k=9"),
        ({"k": 0}, r"k must be > 0 and at most d_sae=8, got k=0"),
        ({"topk_threshold_lr": 0.0}, r"topk_threshold_lr must be in \(0, 1\], got 0.0"),
    ],
)
def test_topk_fields_are_checked_by_name(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TopKTrainingTranscoderConfig(**({"d_in": 4, "d_sae": 8, "d_out": 3, "k": 2} | fields))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_target_of_the_wrong_shape_is_refused(arch: str) -> None:
    sae = make_transcoder(arch, False)
    x = torch.randn(6, D_IN)
    with pytest.raises(
        ValueError, match=rf"sae_out_target has shape \(6, {D_OUT + 1}\).*d_out={D_OUT}"
    ):
        sae.training_forward_pass(step_input(sae, x, torch.randn(6, D_OUT + 1)))
    with pytest.raises(ValueError, match=r"sae_out_target has shape \(5, 5\).*tokens=6"):
        sae.training_forward_pass(step_input(sae, x, torch.randn(5, D_OUT)))
    with pytest.raises(ValueError, match=rf"sae_in has shape \(6, 7\).*d_in={D_IN}"):
        sae.training_forward_pass(step_input(sae, torch.randn(6, 7), torch.randn(6, D_OUT)))


def test_a_step_without_a_target_says_how_to_pass_one() -> None:
    sae = make_transcoder("transcoder", False)
    plain = TrainStepInput(
        sae_in=torch.randn(6, D_IN),
        coefficients={"l1": 1.0},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    with pytest.raises(
        ValueError, match=r"needs the MLP output target.*sae_out_target=.*pack_transcoder_batch"
    ):
        sae.training_forward_pass(plain)


def test_weights_of_another_d_out_are_refused_naming_d_out(tmp_path: Any) -> None:
    make_transcoder("jumprelu_transcoder", False, d_out=D_OUT).save_model(tmp_path)
    other = make_transcoder("jumprelu_transcoder", False, d_out=D_OUT + 2)
    with pytest.raises(
        ValueError,
        match=rf"d_out mismatch: the weights have d_out={D_OUT} .* config says d_out={D_OUT + 2}. Set d_out={D_OUT}",
    ):
        other.load_weights_from_checkpoint(tmp_path)


def test_a_config_edited_to_another_d_out_is_refused_on_load(tmp_path: Any) -> None:
    make_transcoder("transcoder", True).save_model(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(cfg_path.read_text().replace(f'"d_out": {D_OUT}', '"d_out": 11'))
    with pytest.raises(ValueError, match=rf"d_out mismatch: the weights have d_out={D_OUT}"):
        TrainingSAE.load_from_disk(tmp_path)


def test_weights_with_and_without_a_skip_are_told_apart(tmp_path: Any) -> None:
    make_transcoder("topk_transcoder", True).save_model(tmp_path)
    with pytest.raises(
        ValueError, match=r"skip_connection mismatch: .* have W_skip. Set skip_connection=True"
    ):
        make_transcoder("topk_transcoder", False).load_weights_from_checkpoint(tmp_path)


def test_the_error_term_is_refused() -> None:
    sae = make_transcoder("transcoder", False, d_out=D_IN)
    sae._use_error_term = True  # what SAELens' add_sae(..., use_error_term=True) sets
    with pytest.raises(ValueError, match="use_error_term=True is not possible for a transcoder"):
        sae(torch.randn(3, D_IN))


@pytest.mark.parametrize("field", ["hook_name", "hook_name_out"])
def test_an_empty_hook_name_is_refused_on_export(field: str, tmp_path: Any) -> None:
    sae = make_transcoder("transcoder", False)
    with pytest.raises(ValueError, match=rf"{field} must be a non-empty hook name .* got ''"):
        sae.save_inference_model(tmp_path, **{field: ""})
