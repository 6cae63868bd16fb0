"""A transcoder's training step input: the activations it reads and the target it must write.

SAELens' ``TrainStepInput`` carries one tensor, ``sae_in``, which an SAE both reads and
reconstructs. A transcoder reads the MLP's input and is measured against the MLP's *output*, a
second tensor (of width ``d_out``) that SAELens has no field for. Two ways in, both here:

- ``TranscoderStepInput``: a ``TrainStepInput`` with one more field, ``sae_out_target``. Code
  that builds its own step inputs (the plugin's trainer) passes this.
- a *packed* batch: ``sae_in`` of width ``d_in + d_out``, input then target side by side on the
  feature axis (``pack_transcoder_batch``). SAELens' ``SAETrainer.step(batch)`` takes one tensor
  and builds the ``TrainStepInput`` itself, so a packed batch is how an unmodified ``SAETrainer``
  trains a transcoder. SAELens' own multi-hook buffer packs hooks along the feature axis the
  same way (``multi_hook_concat_split_iter``), so its token alignment survives the shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from sae_lens.saes.sae import TrainStepInput


@dataclass
class TranscoderStepInput(TrainStepInput):
    """SAELens' training step input plus the transcoder's target."""

    sae_out_target: torch.Tensor
    """[tokens, d_out]: what the transcoder's output is compared with (the MLP's output at
    ``hook_name_out``), on the same scale as ``sae_in``."""


@jaxtyped(typechecker=beartype)
def pack_transcoder_batch(
    sae_in: Float[torch.Tensor, "tokens d_in"],
    sae_out_target: Float[torch.Tensor, "tokens d_out"],
) -> Float[torch.Tensor, "tokens d_packed"]:
    """``[sae_in | sae_out_target]`` on the feature axis: one batch for ``SAETrainer.step``.

    Both halves go through the trainer's activation scaler together, so with
    ``normalize_activations="expected_average_only_in"`` input and target share one scaling
    factor, which ``fold_activation_norm_scaling_factor`` then folds exactly.
    """
    return torch.cat([sae_in, sae_out_target.to(sae_in.dtype)], dim=-1)


def as_transcoder_step(step_input: TrainStepInput, d_in: int, d_out: int) -> TranscoderStepInput:
    """``step_input`` as a ``TranscoderStepInput`` with both tensors' shapes checked.

    A plain ``TrainStepInput`` must hold a packed batch (width ``d_in + d_out``); it is split.
    Anything else is refused naming the widths and the two ways to pass a target.
    """
    if isinstance(step_input, TranscoderStepInput):
        check_step_shapes(step_input.sae_in, step_input.sae_out_target, d_in, d_out)
        return step_input
    width = step_input.sae_in.shape[-1]
    if step_input.sae_in.ndim != 2 or width != d_in + d_out:
        raise ValueError(
            f"a transcoder's training step needs the MLP output target; got a TrainStepInput "
            f"whose sae_in has shape {tuple(step_input.sae_in.shape)}, which is neither "
            f"[tokens, d_in={d_in}] with a target nor a packed [tokens, d_in + d_out = "
            f"{d_in + d_out}] batch. Pass TranscoderStepInput(..., sae_out_target=<[tokens, "
            f"{d_out}]>) or pack_transcoder_batch(sae_in, target)."
        )
    sae_in, target = step_input.sae_in.split([d_in, d_out], dim=-1)
    return TranscoderStepInput(
        sae_in=sae_in,
        coefficients=step_input.coefficients,
        dead_neuron_mask=step_input.dead_neuron_mask,
        n_training_steps=step_input.n_training_steps,
        is_logging_step=step_input.is_logging_step,
        sae_out_target=target,
    )


@jaxtyped(typechecker=beartype)
def summed_squared_error(
    sae_out: Float[torch.Tensor, "tokens d_out"],
    sae_out_target: Float[torch.Tensor, "tokens d_out"],
) -> Float[torch.Tensor, ""]:
    """‖sae_out − target‖² summed over ``d_out`` and averaged over tokens.

    This is SAELens' ``mse_loss`` convention (``mse(...).sum(dim=-1).mean()``), the local loss
    of every SAELens training SAE, here measured against the MLP's output instead of the input.
    """
    return (sae_out - sae_out_target).pow(2).sum(dim=-1).mean()


def check_step_shapes(
    sae_in: torch.Tensor, sae_out_target: torch.Tensor, d_in: int, d_out: int
) -> None:
    """Refuse an input or target whose shape is not [tokens, d_in] / [tokens, d_out]."""
    if sae_in.ndim != 2 or sae_in.shape[-1] != d_in:
        raise ValueError(
            f"sae_in has shape {tuple(sae_in.shape)}, but this transcoder reads "
            f"[tokens, d_in={d_in}]; flatten batch and position first, and check hook_name."
        )
    if sae_out_target.shape != (sae_in.shape[0], d_out):
        raise ValueError(
            f"sae_out_target has shape {tuple(sae_out_target.shape)}, but this transcoder "
            f"writes [tokens={sae_in.shape[0]}, d_out={d_out}]: the target must be the MLP "
            "output of the same tokens as sae_in; check hook_name_out and d_out."
        )
