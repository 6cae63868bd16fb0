"""The parts of an evaluation: the SAE's features and reconstruction on the model's scale, the
token batches checked, the modules in eval mode, the SAE checked, next-token cross-entropy
sums."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from sae_lens import SAE
from sae_lens.saes.transcoder import Transcoder
from sae_lens.training.activation_scaler import ActivationScaler

from sae_e2e_plugin.evaluation.metrics import IGNORE_TARGET

_SCALED_NORMALIZATIONS = ("expected_average_only_in", "covariance_whitening")


def encode_decode(
    sae: SAE[Any],
    model: Any,
    acts: torch.Tensor,
    scaler: ActivationScaler | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAE's features [batch, pos, d_sae] and reconstruction [batch, pos, d_in] (model scale);
    a transcoder's output [batch, pos, d_out], its skip term included.

    ``acts`` is [batch, pos, d_in] with heads flattened for 4-D hooks. An inference
    SAE with hook_z reshaping on expects the heads unflattened and returns them so.
    """
    batch, pos, _ = acts.shape
    sae_in = rearrange(acts, "batch pos d_in -> (batch pos) d_in").to(sae.device)
    if scaler is not None:
        sae_in = scaler.scale(sae_in)
    if getattr(sae, "hook_z_reshaping_mode", False):
        sae_in = sae_in.unflatten(-1, (-1, model.cfg.d_head))
    feature_acts = sae.encode(sae_in)
    reconstruction = sae.decode(feature_acts).reshape(sae_in.shape[0], -1)
    w_skip = getattr(sae, "W_skip", None)  # a skip transcoder: its decode leaves the skip out
    if w_skip is not None:
        reconstruction = reconstruction + sae_in.to(w_skip.dtype) @ w_skip.T
    if scaler is not None:
        reconstruction = scaler.unscale(reconstruction)
    if feature_acts.is_sparse:  # e.g. TopKSAE(use_sparse_activations=True)
        feature_acts = feature_acts.to_dense()
    # Kept in the SAE's dtype: the splice casts to the model's, the EV is taken in float32.
    unflatten = "(batch pos) width -> batch pos width"
    reconstruction = rearrange(reconstruction, unflatten, batch=batch).to(acts.device)
    return rearrange(feature_acts, unflatten, batch=batch), reconstruction


def ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits, targets, ignore_index=IGNORE_TARGET, reduction="sum"))


def token_batches_checked(
    token_batches: Iterable[torch.Tensor] | torch.Tensor, max_batches: int | None
) -> Iterator[torch.Tensor]:
    batches: Iterable[Any] = (
        [token_batches] if isinstance(token_batches, torch.Tensor) else token_batches
    )
    if max_batches is not None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}.")
        batches = itertools.islice(batches, max_batches)
    for index, tokens in enumerate(batches):
        _check_tokens(index, tokens)
        yield tokens


def _check_tokens(index: int, tokens: Any) -> None:
    integer = isinstance(tokens, torch.Tensor) and not (
        tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool
    )
    if not integer or tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        described = (
            f"a tensor of shape {tuple(tokens.shape)} and dtype {tokens.dtype}"
            if isinstance(tokens, torch.Tensor)
            else f"a {type(tokens).__name__}"
        )
        raise ValueError(
            f"token_batches item {index} is {described}; each batch must be an integer "
            "token tensor of shape (batch, pos) with pos >= 2 (CE needs a next token). "
            "For one long 1-D sequence use tokens[None]; for many sequences, tokens.split(n)."
        )


def resolve_hook_name(sae: SAE[Any], hook_name: str | None) -> str:
    resolved = hook_name or sae.cfg.metadata.hook_name
    if not resolved:
        raise ValueError(
            "hook_name is not set and sae.cfg.metadata.hook_name is empty: pass "
            "hook_name='blocks.L.hook_resid_pre' (the hook the SAE was trained on)."
        )
    return resolved


def is_transcoder(sae: SAE[Any]) -> bool:
    """Whether ``sae`` writes another hook than it reads: SAELens' transcoders and the
    plugin's training transcoders (both have ``cfg.d_out``)."""
    return isinstance(sae, Transcoder) or getattr(sae.cfg, "d_out", None) is not None


def resolve_hook_name_out(sae: SAE[Any], hook_name_out: str | None) -> str | None:
    """A transcoder's output hook (given, or its metadata's); None for an SAE."""
    if not is_transcoder(sae):
        if hook_name_out is not None:
            raise ValueError(
                f"hook_name_out={hook_name_out!r} is given, but sae is an SAE (its cfg has no "
                "d_out), which reads and replaces hook_name alone; leave hook_name_out unset."
            )
        return None
    resolved = hook_name_out or getattr(sae.cfg.metadata, "hook_name_out", None)
    if not resolved:
        raise ValueError(
            "sae is a transcoder, but hook_name_out is not set and "
            "sae.cfg.metadata.hook_name_out is empty: pass hook_name_out="
            "'blocks.L.hook_mlp_out' (the MLP output the transcoder replaces)."
        )
    return resolved


def check_sae(
    sae: SAE[Any],
    scaler: ActivationScaler | None,
    chunk_size: int,
    alive_window_tokens: int | None,
) -> None:
    for size in ("d_in", "d_sae"):
        value = getattr(sae.cfg, size)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"sae.cfg.{size}={value!r}: an SAE's {size} is a whole number >= 1.")
    if sae.cfg.metadata.hook_head_index is not None:
        raise ValueError(
            f"sae.cfg.metadata.hook_head_index={sae.cfg.metadata.hook_head_index}: single-head "
            "SAEs are not supported; train the SAE on all heads (hook_head_index=None)."
        )
    norm = sae.cfg.normalize_activations
    if norm in _SCALED_NORMALIZATIONS and (
        scaler is None or (scaler.scaling_factor is None and scaler.whitening is None)
    ):
        raise ValueError(
            f"sae.cfg.normalize_activations={norm!r}, but the scaling is not in the SAE: pass "
            "activation_scaler=trainer.activation_scaler, or evaluate the exported inference "
            "SAE (SAE.load_from_disk), whose weights have the scaling folded in."
        )
    if chunk_size < 1:
        raise ValueError(f"logits_chunk_size must be >= 1, got {chunk_size}.")
    if alive_window_tokens is not None and alive_window_tokens < 1:
        raise ValueError(
            f"alive_window_tokens must be >= 1 or None (all tokens), got {alive_window_tokens}."
        )


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block; each module's previous mode restored afterwards."""
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
