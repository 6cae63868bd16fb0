"""Transcoders with random weights, and hand-written forward passes to check them against."""

from __future__ import annotations

from typing import Any

import torch

from sae_e2e_plugin import (
    BatchTopKTrainingTranscoder,
    BatchTopKTrainingTranscoderConfig,
    JumpReLUTrainingTranscoder,
    JumpReLUTrainingTranscoderConfig,
    StandardTrainingTranscoder,
    StandardTrainingTranscoderConfig,
    TopKTrainingTranscoder,
    TopKTrainingTranscoderConfig,
    TranscoderStepInput,
)

D_IN, D_SAE, D_OUT, K = 6, 24, 5, 4
ARCHITECTURES = ("transcoder", "jumprelu_transcoder", "topk_transcoder", "batchtopk_transcoder")
CLASSES: dict[str, tuple[type[Any], type[Any], dict[str, Any]]] = {
    "transcoder": (StandardTrainingTranscoder, StandardTrainingTranscoderConfig, {}),
    "jumprelu_transcoder": (JumpReLUTrainingTranscoder, JumpReLUTrainingTranscoderConfig, {}),
    "topk_transcoder": (TopKTrainingTranscoder, TopKTrainingTranscoderConfig, {"k": K}),
    "batchtopk_transcoder": (
        BatchTopKTrainingTranscoder,
        BatchTopKTrainingTranscoderConfig,
        {"k": K},
    ),
}
EXPORTED_CLASS = {
    ("transcoder", False): "Transcoder",
    ("transcoder", True): "SkipTranscoder",
    **{(arch, False): "JumpReLUTranscoder" for arch in ARCHITECTURES[1:]},
    **{(arch, True): "JumpReLUSkipTranscoder" for arch in ARCHITECTURES[1:]},
}


def make_transcoder(arch: str, skip: bool, **fields: Any) -> Any:
    """A fresh training transcoder of ``arch`` (the test sizes unless ``fields`` say otherwise)."""
    model, config, extra = CLASSES[arch]
    sizes = {"d_in": D_IN, "d_sae": D_SAE, "d_out": D_OUT}
    return model(config(**(sizes | extra | fields), skip_connection=skip))


def random_transcoder(arch: str, skip: bool, seed: int = 0, **fields: Any) -> Any:
    """``make_transcoder`` with every parameter random (so biases, skip and decoder norms all
    matter); JumpReLU thresholds drawn in [0.05, 0.35]."""
    torch.manual_seed(seed)
    sae = make_transcoder(arch, skip, **fields)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "threshold":
                param.copy_(0.05 + 0.3 * torch.rand_like(param))
            else:
                param.copy_(torch.randn_like(param) * (0.5 if name.startswith("b_") else 1.0))
    return sae


def hand_forward(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's output on ``x`` [tokens, d_in], written out from its parameters."""
    pre = x @ sae.W_enc + sae.b_enc
    dec_norm = sae.W_dec.norm(dim=-1)
    arch = sae.cfg.architecture()
    if arch == "transcoder":
        acts = pre.relu()
    elif arch == "jumprelu_transcoder":
        acts = pre * (pre > sae.threshold)
    else:
        pre = pre * dec_norm  # rescale_acts_by_decoder_norm (on by default in SAELens)
        acts = (per_token_topk if arch == "topk_transcoder" else batch_topk)(pre, sae.cfg.k)
        acts = acts / dec_norm
    out = acts @ sae.W_dec + sae.b_dec
    if sae.cfg.skip_connection:
        out = out + x @ sae.W_skip.T
    return out


def per_token_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def batch_topk(pre: torch.Tensor, k: float) -> torch.Tensor:
    flat = pre.relu().flatten()
    top = flat.topk(int(k * pre.shape[0]))
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)


def step_input(sae: Any, x: torch.Tensor, y: torch.Tensor, **fields: Any) -> TranscoderStepInput:
    """A step on input ``x`` with target ``y``, every sparsity coefficient at 0.3."""
    return TranscoderStepInput(
        sae_in=x,
        coefficients={name: 0.3 for name in sae.get_coefficients()},
        dead_neuron_mask=fields.get("dead_neuron_mask"),
        n_training_steps=0,
        is_logging_step=False,
        sae_out_target=y,
    )
