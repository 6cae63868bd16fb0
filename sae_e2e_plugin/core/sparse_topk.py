"""A TopK SAE's training forward pass computed from its k active latents.

SAELens' ``TopKTrainingSAE.training_forward_pass`` keeps every latent: it scatters the top k
into a dense [rows, d_sae] matrix, multiplies that by the decoder, and its backward pass runs
dense [rows, d_sae] gradients through both weight matrices. With k = 32 of 4,608 latents
nearly all of that multiplies zeros; on a CPU it is six [rows × d_in × d_sae] matrix products
a step. Here only the encoder's forward product stays dense (choosing the top k needs every
pre-activation). The decoder reads the k chosen rows (``F.embedding_bag``), and the encoder's
backward pass touches only the k chosen columns (``_ChosenPreActivations``).

The numbers are SAELens' own: the same pre-activations, the same top-k choice, the same loss
terms (the reconstruction MSE and the auxiliary loss on dead latents), the same dense
``feature_acts`` and ``hidden_pre`` in the output. Only sums run in another order (over the k
chosen latents instead of over every latent), so weights agree with SAELens' after a step to
float rounding, not bit for bit. ``sparse_topk_unsupported`` says when SAELens' own forward
pass must run instead.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE

# Methods whose SAELens versions this module re-expresses: a subclass overriding any of
# them trains something else (BatchTopK, AbsTopK, Matryoshka, a transcoder) and keeps its own
# forward pass.
_REPLACED = (
    "training_forward_pass",
    "process_sae_in",
    "encode_with_hidden_pre",
    "get_activation_fn",
    "decode",
    "calculate_aux_loss",
    "calculate_topk_aux_loss",
)
# Normalisations with nothing to undo inside the SAE ("expected_average_only_in" scales in
# the trainer's ActivationScaler, outside it).
_IDENTITY_NORMALIZATIONS = ("none", "expected_average_only_in")


def sparse_topk_unsupported(sae: Any) -> str | None:
    """Why ``sae`` must train with SAELens' own forward pass; None when this module's applies."""
    if not isinstance(sae, TopKTrainingSAE):
        return f"{type(sae).__name__} is not a TopK SAE"
    overridden = [m for m in _REPLACED if getattr(type(sae), m) is not getattr(TopKTrainingSAE, m)]
    if overridden:
        return f"{type(sae).__name__} overrides {', '.join(overridden)}"
    cfg = sae.cfg
    if cfg.normalize_activations not in _IDENTITY_NORMALIZATIONS:
        return f"normalize_activations={cfg.normalize_activations!r} acts inside the SAE"
    if cfg.reshape_activations != "none":
        return f"reshape_activations={cfg.reshape_activations!r}"
    if cfg.use_sparse_activations or sae.use_error_term:
        return "use_sparse_activations or use_error_term is set"
    if sae.W_enc.device.type not in ("cpu", "cuda"):  # where torch has sparse CSR products
        return f"the SAE is on {sae.W_enc.device.type!r}, not a CPU or a CUDA GPU"
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in sae.modules()):
        return "hooks are attached to the SAE"
    return None


def sparse_topk_training_forward(
    sae: TopKTrainingSAE, step_input: TrainStepInput
) -> TrainStepOutput:
    """``sae.training_forward_pass(step_input)``, with sums over the k chosen latents only.

    Call only where ``sparse_topk_unsupported(sae)`` is None. ``hidden_pre`` in the output
    carries no gradient (the loss reaches the encoder through the chosen latents)."""
    sae_in = sae.process_sae_in(step_input.sae_in)
    rescale = sae.cfg.rescale_acts_by_decoder_norm
    norms = sae.W_dec.norm(dim=-1) if rescale else None
    with torch.no_grad():  # every pre-activation, as SAELens computes them
        pre = sae_in @ sae.W_enc + sae.b_enc
        hidden_pre = pre if norms is None else pre * norms
    chosen = _top_k(hidden_pre, sae.cfg.k)
    values = _pre_activations(sae, sae_in, pre, chosen, norms).relu()
    sae_out = _decode(chosen, values, sae.W_dec, norms) + sae.b_dec
    feature_acts = torch.zeros_like(hidden_pre).scatter(-1, chosen, values)
    mse_loss = sae.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
    aux = _aux_loss(sae, step_input, sae_in, pre, hidden_pre, sae_out, norms)
    losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux}
    return TrainStepOutput(
        sae_in=step_input.sae_in,
        sae_out=sae_out,
        feature_acts=feature_acts,
        hidden_pre=hidden_pre,
        loss=mse_loss + aux,
        losses=losses,
    )


def _aux_loss(
    sae: TopKTrainingSAE,
    step_input: TrainStepInput,
    sae_in: torch.Tensor,
    pre: torch.Tensor,
    hidden_pre: torch.Tensor,
    sae_out: torch.Tensor,
    norms: torch.Tensor | None,
) -> torch.Tensor:
    """SAELens' TopK auxiliary loss: the top dead latents (half of d_in at most) reconstruct
    what the live ones left, scaled down while few latents are dead."""
    dead = step_input.dead_neuron_mask
    if dead is None or (n_dead := int(dead.sum())) == 0:
        return sae_out.new_tensor(0.0)
    residual = (step_input.sae_in - sae_out).detach()
    k_aux = sae_in.shape[-1] // 2
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    chosen = _top_k(torch.where(dead[None], hidden_pre, -torch.inf), k_aux)
    values = _pre_activations(sae, sae_in, pre, chosen, norms)  # no ReLU, as in SAELens
    recons = _decode(chosen, values, sae.W_dec, norms)
    return sae.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The columns of each row's k largest scores, in increasing order (SAELens' choice, as
    ``torch.topk`` makes it; sorted, the encoder's gradient can hold them as CSR)."""
    return torch.topk(scores, k=k, dim=-1, sorted=False).indices.sort(dim=-1).values


def _pre_activations(
    sae: TopKTrainingSAE,
    sae_in: torch.Tensor,
    pre: torch.Tensor,
    chosen: torch.Tensor,
    norms: torch.Tensor | None,
) -> torch.Tensor:
    """The chosen latents' pre-activations, rescaled as SAELens rescales them, with gradients
    to the encoder, the input and the decoder's norms."""
    values = chosen_pre_activations(sae_in, sae.W_enc, sae.b_enc, chosen, pre.gather(-1, chosen))
    return values if norms is None else values * norms[chosen]


@jaxtyped(typechecker=beartype)
def chosen_pre_activations(
    sae_in: Float[torch.Tensor, "rows d_in"],
    w_enc: Float[torch.Tensor, "d_in d_sae"],
    b_enc: Float[torch.Tensor, " d_sae"],
    chosen: Int[torch.Tensor, "rows k"],
    values: Float[torch.Tensor, "rows k"],
) -> Float[torch.Tensor, "rows k"]:
    """``(sae_in @ w_enc + b_enc).gather(-1, chosen)``, given as ``values`` (computed without
    gradient), with that expression's gradient computed from the chosen columns only. Each row
    of ``chosen`` must hold distinct columns in increasing order."""
    return _ChosenPreActivations.apply(sae_in, w_enc, b_enc, chosen, values)


class _ChosenPreActivations(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        sae_in: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        chosen: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(sae_in, w_enc, chosen)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        sae_in, w_enc, chosen = ctx.saved_tensors
        grad_in = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # row r: Σ_j grad[r, j] · w_enc[:, chosen[r, j]]
            grad_in = _weighted_rows(chosen, grad, w_enc.t().contiguous()).to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _encoder_weight_grad(sae_in, chosen, grad, w_enc.shape[1]).to(w_enc.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = w_enc.new_zeros(w_enc.shape[1])
            grad_b.index_add_(0, chosen.flatten(), grad.flatten().to(w_enc.dtype))
        return grad_in, grad_w, grad_b, None, None


def _encoder_weight_grad(
    sae_in: torch.Tensor, chosen: torch.Tensor, grad: torch.Tensor, d_sae: int
) -> torch.Tensor:
    """Σ_r sae_in[r] ⊗ grad[r] at the chosen columns, the gradient of ``w_enc`` [d_in, d_sae]:
    ``grad`` as a sparse [rows, d_sae] matrix of k entries a row, transposed, times ``sae_in``."""
    rows, k = chosen.shape
    starts = torch.arange(0, rows * k + 1, k, device=chosen.device)
    # The sparse product has no bf16 kernel on CPUs; float32 is the more exact sum anyway.
    dtype = torch.promote_types(grad.dtype, torch.float32)
    # Each row's columns are distinct and sorted (``_top_k``), as CSR requires: no check needed.
    with warnings.catch_warnings():  # torch calls its sparse CSR layout "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        values = grad.flatten().to(dtype)
        shape = (rows, d_sae)
        by_row = torch.sparse_csr_tensor(
            starts, chosen.flatten(), values, shape, check_invariants=False
        )
    with torch.autocast(sae_in.device.type, enabled=False):  # it would cast back to bf16
        return (by_row.t() @ sae_in.to(dtype)).t()


@jaxtyped(typechecker=beartype)
def _decode(
    chosen: Int[torch.Tensor, "rows k"],
    values: Float[torch.Tensor, "rows k"],
    w_dec: Float[torch.Tensor, "d_sae d_in"],
    norms: Float[torch.Tensor, " d_sae"] | None,
) -> Float[torch.Tensor, "rows d_in"]:
    """Σ_j values[r, j] · w_dec[chosen[r, j]] (each row divided by its norm when rescaled)."""
    weights = values if norms is None else values * (1 / norms)[chosen]
    return _weighted_rows(chosen, weights, w_dec)


def _weighted_rows(
    chosen: torch.Tensor, weights: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """Row r: Σ_j weights[r, j] · table[chosen[r, j]] (differentiable in weights and table)."""
    return F.embedding_bag(chosen, table, per_sample_weights=weights.to(table.dtype), mode="sum")
