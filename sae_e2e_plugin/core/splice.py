"""One SAE in a ``HookedTransformer``: where it sits, the shared prefix, and the model's head.

One training step needs two runs of the model on the same tokens: a clean one
(no grad) that gives the SAE's input, the original next-token distribution and
the clean downstream activations, and a patched one (with grad flowing into the
SAE's output only) in which the SAE's reconstruction replaces the activation at
``hook_name``.

Everything before the SAE's block is identical in the two runs, so it is run
once (``run_prefix``) and both runs continue from the residual stream entering
that block (TransformerLens' ``start_at_layer``). Hooks outside the blocks
(e.g. ``hook_embed``) have no shared prefix and re-run the whole model.

The runs themselves are ``core.multi_splice``'s: a single SAE is the one-entry case of a run of
several (``core.model_splice.run_clean`` and ``run_patched``)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from beartype import beartype
from einops import rearrange
from jaxtyping import Float, Int, jaxtyped
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_e2e_plugin.core.losses import CleanLogProbs
from sae_e2e_plugin.core.output_hook import check_output_hook, check_output_width

FwdHooks = list[tuple[str | Callable[..., Any], Callable[..., Any]]]
"""(hook name, hook function) pairs for ``model.hooks(fwd_hooks=...)``."""

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_RESID_POST_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


@dataclass(frozen=True)
class HookProbe:
    """What one tiny forward pass tells about a model's hook points."""

    order: tuple[str, ...]
    """Hook names in the order they fire during a forward pass."""
    widths: dict[str, int]
    """Last-dimension width of each hook's activation (heads × d_head for ``hook_z``-style 4-D ones)."""


@dataclass(frozen=True)
class SplicePlan:
    """Where the SAE sits in the model and which later activations are compared."""

    hook_name: str
    """The hook whose activation the SAE reads (and, without ``hook_name_out``, replaces)."""
    start_layer: int | None
    """The block containing ``hook_name``: the shared prefix stops there. ``None``: no shared prefix."""
    downstream_hooks: tuple[str, ...]
    """Hooks after ``write_hook`` whose patched activations are compared with the clean ones."""
    hook_name_out: str | None = field(default=None, kw_only=True)
    """A transcoder's output hook (the MLP's output, in ``hook_name``'s block): the clean run
    records its target there and the patched run replaces it. None: an SAE."""

    @property
    def write_hook(self) -> str:
        """The hook whose activation the replacement takes the place of."""
        return self.hook_name_out or self.hook_name


@dataclass
class Prefix:
    """The model's state entering block ``start_layer``, shared by the clean and patched runs."""

    tokens: torch.Tensor
    """[batch, pos] token ids."""
    residual: torch.Tensor | None
    """[batch, pos, d_model] residual stream entering ``start_layer`` (None: re-run from tokens)."""
    start_layer: int | None
    shortformer_pos_embed: torch.Tensor | None
    attention_mask: torch.Tensor | None


@dataclass
class CleanRun:
    """Outputs of the clean (unpatched) run; none of them carries grad."""

    acts: torch.Tensor
    """[batch, pos, d_in] activation at the SAE's hook (heads flattened for 4-D hooks)."""
    final_resid: torch.Tensor | None
    """[batch, pos, d_model] residual stream after the last block (before the final norm);
    None when the run stopped after the SAE's block."""
    downstream: dict[str, torch.Tensor]
    """Activation at each downstream hook, by hook name."""
    log_probs: CleanLogProbs | None = None
    """``final_resid``'s next-token log-probabilities when they were made once for several
    patched runs (``core.losses.clean_log_probs``); None: each KL makes them a chunk at a time."""
    target: torch.Tensor | None = None
    """[batch, pos, d_out] a transcoder's target: the clean activation at ``hook_name_out``
    (the MLP's output). None: an SAE, whose target is ``acts``."""


@dataclass
class PatchedRun:
    """Outputs of the run with the SAE's reconstruction spliced in; they carry grad."""

    final_resid: torch.Tensor
    """[batch, pos, d_model] residual stream after the last block."""
    downstream: dict[str, torch.Tensor]
    """Activation at each downstream hook, by hook name."""


@torch.no_grad()
def probe_hooks(model: HookedTransformer) -> HookProbe:
    """Run the model once on two tokens and record every hook's firing order and width."""
    order: list[str] = []
    widths: dict[str, int] = {}

    def record(act: torch.Tensor, hook: HookPoint) -> None:
        name = _hook_name(hook)
        if name not in widths:
            order.append(name)
            widths[name] = _flat_width(act)

    tokens = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    hooks: FwdHooks = [(name, record) for name in model.hook_dict]
    with model.hooks(fwd_hooks=hooks):
        model(tokens, return_type=None)
    return HookProbe(order=tuple(order), widths=widths)


def refuse_repeated(field: str, names: tuple[str, ...], kind: str) -> None:
    """A list of hooks (``kind``: hook, module) that names one twice is a mistake: refused."""
    if len(set(names)) != len(names):
        raise ValueError(f"{field} lists a {kind} twice: {list(names)}.")


def plan_splice(
    model: HookedTransformer,
    hook_name: str,
    downstream_hooks: Sequence[str] | None,
    *,
    d_in: int | None = None,
    probe: HookProbe | None = None,
    hook_name_out: str | None = None,
    d_out: int | None = None,
) -> SplicePlan:
    """Check ``hook_name`` (and ``d_in``, the downstream hooks) against the model; plan the runs.

    A transcoder also gives ``hook_name_out`` (and ``d_out``): its output replaces the
    activation there (``core.output_hook``). ``downstream_hooks=None`` means every
    residual-stream hook after the replaced one: ``blocks.k.hook_resid_post`` for each block k
    whose output comes after it. Raises ValueError naming the field, the value and the fix for
    anything that cannot be spliced.
    """
    probe = probe or probe_hooks(model)
    _check_hook_exists("hook_name", hook_name, probe)
    if d_in is not None and probe.widths[hook_name] != d_in:
        raise ValueError(
            f"sae.d_in is {d_in}, but the activation at hook_name={hook_name!r} has width "
            f"{probe.widths[hook_name]}. Set sae.d_in={probe.widths[hook_name]} "
            f"or choose a hook of width {d_in}."
        )
    if hook_name_out is not None:
        _check_hook_exists("hook_name_out", hook_name_out, probe)
        check_output_width(hook_name_out, probe.widths[hook_name_out], d_out, "hook")
        check_output_hook(hook_name, hook_name_out, probe.order, _block_of)
    write_hook = hook_name_out or hook_name
    position = probe.order.index(write_hook)
    if downstream_hooks is None:
        later = probe.order[position + 1 :]
        downstream = tuple(name for name in later if _RESID_POST_RE.match(name))
    else:
        downstream = tuple(downstream_hooks)
        for name in downstream:
            _check_hook_exists("downstream_hooks", name, probe)
            if probe.order.index(name) <= position:
                raise ValueError(
                    f"downstream_hooks contains {name!r}, which runs at or before "
                    f"{'hook_name_out' if hook_name_out else 'hook_name'}={write_hook!r}; the SAE cannot change it. "
                    "Use hooks that run "
                    "later, or leave downstream_hooks unset for every later residual-stream hook."
                )
        refuse_repeated("downstream_hooks", downstream, "hook")
    return SplicePlan(
        hook_name=hook_name,
        start_layer=_block_of(hook_name),
        downstream_hooks=downstream,
        hook_name_out=hook_name_out,
    )


def _block_of(hook_name: str) -> int | None:
    match = _BLOCK_RE.match(hook_name)
    return int(match.group(1)) if match else None


@jaxtyped(typechecker=beartype)
@torch.no_grad()
def run_prefix(
    model: HookedTransformer,
    tokens: Int[torch.Tensor, "batch pos"],
    start_layer: int | None,
) -> Prefix:
    """Embed the tokens and run the blocks before ``start_layer`` once, without grad."""
    if start_layer is None:
        return Prefix(tokens, None, None, None, None)
    residual, _, shortformer_pos_embed, attention_mask = model.input_to_embed(tokens)
    if start_layer > 0:
        residual = model(
            residual,
            start_at_layer=0,
            stop_at_layer=start_layer,
            shortformer_pos_embed=shortformer_pos_embed,
            attention_mask=attention_mask,
        )
    return Prefix(tokens, residual, start_layer, shortformer_pos_embed, attention_mask)


def one_block(
    model: HookedTransformer, prefix: Prefix, layer: int, resid: torch.Tensor
) -> torch.Tensor:
    """Block ``layer`` alone on ``resid``: the unit ``checkpoint_blocks`` recomputes."""
    return model(
        resid,
        start_at_layer=layer,
        stop_at_layer=layer + 1,
        shortformer_pos_embed=prefix.shortformer_pos_embed,
        attention_mask=prefix.attention_mask,
    )


def model_head(model: HookedTransformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's head as a function: final residual [tokens, d_model] → logits [tokens, vocab]."""
    return partial(_head, model)


@jaxtyped(typechecker=beartype)
def logits_from_final_resid(
    model: HookedTransformer, final_resid: Float[torch.Tensor, "batch pos d_model"]
) -> Float[torch.Tensor, "batch pos vocab"]:
    """Apply the final norm, the unembedding and any logit soft-cap (as ``model.forward`` does)."""
    if model.cfg.normalization_type is not None:
        final_resid = model.ln_final(final_resid)
    # resid @ W_U + b_U, as TransformerLens' Unembed computes it, but reading W_U where it is
    # stored: Unembed.forward copies W_U.T to a contiguous tensor on every call (an extra
    # d_vocab × d_model copy per chunk of tokens, as long as the product itself in bf16).
    unembed = model.unembed
    flat = final_resid.reshape(-1, final_resid.shape[-1])
    logits = torch.addmm(unembed.b_U, flat, unembed.W_U).reshape(*final_resid.shape[:-1], -1)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _head(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    return logits_from_final_resid(model, resid.unsqueeze(0)).squeeze(0)


def run_from(model: HookedTransformer, prefix: Prefix, stop: int) -> torch.Tensor:
    """The residual stream entering block ``stop``, run on from where ``prefix`` stopped."""
    if prefix.residual is None:
        return model(prefix.tokens, stop_at_layer=stop)
    return model(
        prefix.residual,
        start_at_layer=prefix.start_layer,
        stop_at_layer=stop,
        shortformer_pos_embed=prefix.shortformer_pos_embed,
        attention_mask=prefix.attention_mask,
    )


def _hook_name(hook: HookPoint) -> str:
    # TransformerLens names every hook point of a model when it builds the model.
    assert hook.name is not None
    return hook.name


def flatten_heads(act: torch.Tensor) -> torch.Tensor:
    """A hook's activation as [batch, pos, width]: 4-D ones (e.g. ``hook_z``) with their heads
    side by side, the layout SAELens' activation store gives SAEs on such hooks."""
    if act.ndim == 4:
        return rearrange(act, "batch pos head d_head -> batch pos (head d_head)")
    return act


def _flat_width(act: torch.Tensor) -> int:
    return act.shape[-1] * act.shape[-2] if act.ndim == 4 else act.shape[-1]


def _check_hook_exists(field: str, name: str, probe: HookProbe) -> None:
    if name in probe.widths:
        return
    close = difflib.get_close_matches(name, probe.order, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"{field}={name!r} is not a hook point of this model.{hint} "
        "Hook names look like 'blocks.6.hook_resid_pre'; list them with model.hook_dict."
    )
