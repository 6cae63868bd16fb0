"""The four training transcoders: SAELens' training SAEs of each architecture, as transcoders.

Each class is ``TrainingTranscoderMixin`` (``transcoders/model.py``: shapes, skip, target)
before SAELens' training SAE of its architecture, whose encoder, activation and sparsity
terms it uses unchanged; only what a target or an export needs differs, and is here.
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.standard_sae import StandardTrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE

from sae_e2e_plugin.transcoders.config import (
    BatchTopKTrainingTranscoderConfig,
    JumpReLUTrainingTranscoderConfig,
    StandardTrainingTranscoderConfig,
    TopKTrainingTranscoderConfig,
)
from sae_e2e_plugin.transcoders.model import TrainingTranscoderMixin
from sae_e2e_plugin.transcoders.step import TranscoderStepInput
from sae_e2e_plugin.transcoders.thresholds import batch_topk_threshold, moving_average

# pyright: reportIncompatibleVariableOverride=false, reportIncompatibleMethodOverride=false


class StandardTrainingTranscoder(TrainingTranscoderMixin, StandardTrainingSAE):
    """ReLU transcoder trained with SAELens' ``standard`` L1 term (``l1_coefficient``)."""

    cfg: StandardTrainingTranscoderConfig

    def __init__(self, cfg: StandardTrainingTranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)


class JumpReLUTrainingTranscoder(TrainingTranscoderMixin, JumpReLUTrainingSAE):
    """JumpReLU transcoder trained with SAELens' ``jumprelu`` L0 term (``l0_coefficient``)."""

    cfg: JumpReLUTrainingTranscoderConfig

    def __init__(self, cfg: JumpReLUTrainingTranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def _before_step(self) -> None:
        # As SAELens' JumpReLU step: keep the threshold >= 0 (projected, not clamped in the
        # graph), so the exported JumpReLU (ReLU, then the threshold) gives the same output.
        with torch.no_grad():
            self.threshold.data.clamp_(min=0.0)


def _aux_loss_on_target(
    sae: TopKTrainingSAE,
    step_input: TrainStepInput,
    hidden_pre: torch.Tensor,
    sae_out: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """SAELens' top-k auxiliary loss with the MLP output as what is reconstructed: dead
    features are trained to predict ``target − output`` (the output includes the skip term)."""
    if not isinstance(step_input, TranscoderStepInput):
        raise TypeError("a transcoder's auxiliary loss needs a TranscoderStepInput")
    loss = sae.calculate_topk_aux_loss(
        sae_in=step_input.sae_out_target.to(sae_out.dtype),
        sae_out=sae_out,
        hidden_pre=hidden_pre,
        dead_neuron_mask=step_input.dead_neuron_mask,
    )
    return {"auxiliary_reconstruction_loss": loss}


class AuxLossOnTargetMixin(TrainingTranscoderMixin):
    """The top-k families' auxiliary loss, measured against the MLP output target."""

    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return _aux_loss_on_target(self, step_input, hidden_pre, sae_out)  # type: ignore[arg-type]


class TopKTrainingTranscoder(AuxLossOnTargetMixin, TopKTrainingSAE):
    """Per-token top-k transcoder (SAELens' ``topk`` activation and auxiliary loss).

    Export: SAELens has no TopK transcoder inference class, and a per-token top-k is not a
    JumpReLU (``transcoders/thresholds.py``). The transcoder also learns ``topk_threshold``,
    a moving average (rate ``topk_threshold_lr``) of each training batch's threshold that keeps
    k features per token *on average*, and is exported as a JumpReLU transcoder with that one
    threshold for every feature. The export equals the top-k output exactly on the tokens whose
    k-th largest pre-activation is above the threshold and whose (k+1)-th is not; elsewhere it
    keeps more or fewer than k features. Its L0 matches k on average over data like the
    training data, not per token. The training class itself (eval mode too) keeps applying the
    per-token top-k.
    """

    cfg: TopKTrainingTranscoderConfig
    topk_threshold: torch.Tensor

    def __init__(self, cfg: TopKTrainingTranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # float64, as SAELens' batch top-k threshold: a moving average in bf16 would stall.
        threshold = torch.tensor(0.0, dtype=torch.double, device=self.W_dec.device)
        self.register_buffer("topk_threshold", threshold)

    def _after_step(self, output: TrainStepOutput) -> None:
        batch_threshold = batch_topk_threshold(output.hidden_pre.detach(), self.cfg.k)
        self.topk_threshold = moving_average(
            self.topk_threshold, batch_threshold, self.cfg.topk_threshold_lr
        )
        output.metrics["topk_threshold"] = self.topk_threshold

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            # The threshold is in units of (pre-activation × ‖W_dec row‖), and the fold divided
            # W_dec by the factor (the same correction SAELens makes for batch top-k).
            self.topk_threshold /= scaling_factor

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)  # folds decoder norms
        threshold = state_dict.pop("topk_threshold").item()
        state_dict["threshold"] = torch.full_like(state_dict["b_enc"], threshold)


class BatchTopKTrainingTranscoder(AuxLossOnTargetMixin, BatchTopKTrainingSAE):
    """Batch top-k transcoder (SAELens' ``batchtopk``): k features per token on average over
    each batch, and SAELens' learned threshold, exported as a JumpReLU transcoder with it (as
    SAELens exports batch top-k SAEs). The training class, in eval mode too, keeps applying the
    batch top-k to whatever batch it is given; the export applies the threshold per token.
    """

    cfg: BatchTopKTrainingTranscoderConfig

    def __init__(self, cfg: BatchTopKTrainingTranscoderConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    def _after_step(self, output: TrainStepOutput) -> None:
        # SAELens' own update: a moving average of the smallest kept activation.
        self.update_topk_threshold(output.feature_acts)
        output.metrics["topk_threshold"] = self.topk_threshold


TRAINING_TRANSCODERS: dict[str, tuple[type[Any], type[Any]]] = {
    cls.architecture(): (model, cls)
    for model, cls in (
        (StandardTrainingTranscoder, StandardTrainingTranscoderConfig),
        (JumpReLUTrainingTranscoder, JumpReLUTrainingTranscoderConfig),
        (TopKTrainingTranscoder, TopKTrainingTranscoderConfig),
        (BatchTopKTrainingTranscoder, BatchTopKTrainingTranscoderConfig),
    )
}
"""Training architecture name → (training class, config class), as SAELens' registry holds them."""
