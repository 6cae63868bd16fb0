"""What makes a SAELens training SAE a transcoder: output-space decoder, optional skip, a target.

``TrainingTranscoderMixin`` goes first in a training transcoder's bases, before the SAELens
training SAE of its architecture (``StandardTrainingSAE``, ``JumpReLUTrainingSAE``, ...), whose
encoder, activation, decoder and sparsity terms it keeps. It changes four things:

- the weights: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out], ``b_dec`` [d_out] and, with
  ``skip_connection``, ``W_skip`` [d_out, d_in] (SAELens' ``SkipTranscoder`` names and layout,
  so the export is a copy);
- the input is never shifted by ``b_dec`` (it lives in the output space);
- the output adds the skip term ``x @ W_skip.T``;
- the training step measures the output against the MLP output target
  (``TranscoderStepInput.sae_out_target``, or the second half of a packed batch) rather than
  against the input. SAELens' ``training_forward_pass`` compares the output with its input,
  so the step is written out here from the architecture's own parts (``encode_with_hidden_pre``,
  ``decode``, ``calculate_aux_loss``); an architecture's extra per-step work (JumpReLU's
  threshold projection, the top-k thresholds) is in ``_before_step`` / ``_after_step``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import nn

from sae_e2e_plugin.transcoders.export import check_weight_shapes, write_inference_folder
from sae_e2e_plugin.transcoders.step import as_transcoder_step, summed_squared_error


class TrainingTranscoderMixin:
    """Turns the SAELens training SAE after it in the MRO into a transcoder (module docstring)."""

    # Declared for the type checker; the SAELens class after this one defines them.
    cfg: Any
    dtype: torch.dtype
    device: torch.device
    training: bool
    use_error_term: bool
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    W_skip: nn.Parameter
    hook_sae_input: Any
    hook_sae_output: Any
    run_time_activation_norm_fn_in: Any

    def initialize_weights(self) -> None:
        # The architecture's own initialisation first (it adds b_enc, ...), then the
        # transcoder's shapes replace the SAE-shaped encoder and decoder it made.
        super().initialize_weights()  # type: ignore[misc]
        cfg = self.cfg
        w_dec = _rows(cfg.d_sae, cfg.d_out, cfg.decoder_init_norm, self.dtype, self.device)
        # Untied from the decoder (an SAE starts with W_enc = W_dec.T): input and output are
        # different spaces. Each feature's encoder vector gets the decoder's starting norm.
        w_enc = _rows(cfg.d_sae, cfg.d_in, cfg.decoder_init_norm, self.dtype, self.device)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_enc.T.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, dtype=self.dtype, device=self.device))
        if cfg.skip_connection:
            # Zeros at the start, as SAELens' SkipTranscoder: the skip is learned from nothing.
            skip = torch.zeros(cfg.d_out, cfg.d_in, dtype=self.dtype, device=self.device)
            self.W_skip = nn.Parameter(skip)

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        # As SAELens' Transcoder: dtype, hook, normalisation; never "- b_dec" (output space).
        sae_in = self.hook_sae_input(sae_in.to(self.dtype))
        return self.run_time_activation_norm_fn_in(sae_in)

    @jaxtyped(typechecker=beartype)
    def skip_output(
        self, x: Float[torch.Tensor, "*tokens d_in"]
    ) -> Float[torch.Tensor, "*tokens d_out"] | None:
        """The skip connection's term ``x @ W_skip.T``; None without ``skip_connection``."""
        if not self.cfg.skip_connection:
            return None
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def transcode(self, x: torch.Tensor, feature_acts: torch.Tensor) -> torch.Tensor:
        """The output [*tokens, d_out] from the input ``x`` and its feature activations."""
        sae_out = self.decode(feature_acts)  # type: ignore[attr-defined]
        skip = self.skip_output(x)
        return sae_out if skip is None else sae_out + skip.to(sae_out.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Input [*tokens, d_in] → output [*tokens, d_out]: the MLP's replacement."""
        if self.use_error_term:
            raise ValueError(
                "use_error_term=True is not possible for a transcoder: its error term is the "
                "MLP output minus the transcoder's, and the MLP output is not its input. "
                "Leave use_error_term=False."
            )
        feature_acts = self.encode(x)  # type: ignore[attr-defined]
        return self.hook_sae_output(self.transcode(x, feature_acts))

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step's forward pass: the local loss is ‖output − MLP output‖² (summed
        over d_out, averaged over tokens, SAELens' convention) plus the architecture's terms.

        ``step_input`` is a ``TranscoderStepInput`` or a packed batch (``transcoders.step``).
        The returned ``TrainStepOutput.sae_in`` is the *target*: SAELens' trainer reads that
        field only to measure ``sae_out`` against it (explained variance in its log), which for
        a transcoder must be the MLP output, not its input.
        """
        step = as_transcoder_step(step_input, self.cfg.d_in, self.cfg.d_out)
        self._before_step()
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step.sae_in)  # type: ignore[attr-defined]
        sae_out = self.transcode(step.sae_in, feature_acts)
        target = step.sae_out_target.to(sae_out.dtype)
        mse = summed_squared_error(sae_out, target)
        aux = self.calculate_aux_loss(  # type: ignore[attr-defined]
            step_input=step, feature_acts=feature_acts, hidden_pre=hidden_pre, sae_out=sae_out
        )
        aux_terms = aux if isinstance(aux, dict) else {"auxiliary_loss": aux}
        loss = mse
        for term in aux_terms.values():
            loss = loss + term
        output = TrainStepOutput(
            sae_in=target,  # the MLP output: what SAELens' trainer measures sae_out against
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=loss,
            losses={"mse_loss": mse, **aux_terms},
        )
        self._after_step(output)
        return output

    def _before_step(self) -> None:
        """An architecture's work before the forward pass (none by default)."""

    def _after_step(self, output: TrainStepOutput) -> None:
        """An architecture's work after the forward pass (none by default)."""

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        # Weights of another shape are refused by field (d_in, d_out, d_sae, skip_connection)
        # before torch's "size mismatch for W_dec" could name a tensor instead.
        check_weight_shapes(state_dict, self.cfg)
        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]

    def save_inference_model(
        self,
        path: str | Path,
        *,
        hook_name: str | None = None,
        hook_name_out: str | None = None,
    ) -> tuple[Path, Path]:
        """Write SAELens' inference format (``cfg.json`` + ``sae_weights.safetensors``) to
        ``path``: plain ``SAE.load_from_disk(path)`` returns SAELens' ``Transcoder``,
        ``SkipTranscoder``, ``JumpReLUTranscoder`` or ``JumpReLUSkipTranscoder``.

        ``hook_name`` (the MLP's input, e.g. ``blocks.6.ln2.hook_normalized``) and
        ``hook_name_out`` (its output, e.g. ``blocks.6.hook_mlp_out``) are written into
        ``cfg.metadata`` when given (else whatever the config's metadata holds); SAELens'
        ``HookedSAETransformer.add_sae`` reads them to splice the transcoder. The state dict
        passes through ``process_state_dict_for_saving_inference`` (decoder-norm folding,
        top-k thresholds → JumpReLU thresholds) as SAELens' own export does.
        """
        state_dict = self.state_dict()  # type: ignore[attr-defined]
        self.process_state_dict_for_saving_inference(state_dict)  # type: ignore[attr-defined]
        cfg_dict = self.cfg.get_inference_sae_cfg_dict()
        return write_inference_folder(path, state_dict, cfg_dict, hook_name, hook_name_out)


def _rows(
    n_rows: int, width: int, norm: float | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A [n_rows, width] Kaiming-uniform matrix, each row scaled to ``norm`` when it is set
    (SAELens' ``decoder_init_norm``, 0.1 by default)."""
    rows = torch.empty(n_rows, width, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(rows)
    if norm is not None:
        with torch.no_grad():
            rows *= norm / rows.norm(dim=-1, keepdim=True)
    return rows
