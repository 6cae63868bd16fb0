"""Several SAEs in one model: where each sits, one clean run for all, and a joint patched run.

The plan and the clean run's record (``MultiSplicePlan``, ``MultiCleanRun``) hold for either
model family; the runs here are the ``HookedTransformer``'s (a Hugging Face model's are in
``core.hf_multi``). Callers go through ``core.model_splice``, which picks the family. A run of
one SAE is the one-entry case: its plan, prefix and clean run are the single SAE's own, and its
patched run is the joint run of one splice that returns the reconstruction.

Two ways to splice several SAEs (``MultiSplicePlan.mode``):

- ``"joint"``: every SAE is spliced into the same patched run. Each SAE reads the activation
  as it arrives at its hook in that run (after the reconstructions of the SAEs before it, as the
  reference implementation's multi-position mode does) and its reconstruction replaces it.
  The downstream hooks are compared after the latest SAE, so every term depends on all of them.
- ``"independent"``: each SAE is spliced alone into its own continuation of the model. All of
  them share the prefix up to the earliest SAE's block and one clean run, which records every
  SAE's input and the residual stream entering each SAE's block (its own prefix). Each SAE's
  downstream hooks are those a single run at its hook would compare.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_e2e_plugin.core.losses import CleanLogProbs
from sae_e2e_plugin.core.splice import (
    CleanRun,
    FwdHooks,
    PatchedRun,
    Prefix,
    SplicePlan,
    flatten_heads,
    one_block,
    run_from,
)

SpliceMode = Literal["joint", "independent"]

Splice = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""One SAE's splice in a joint run: (the activation arriving at its ``hook_name``, the one
arriving at the hook it replaces), each [batch, pos, width] with heads flattened, → the
replacement of the second. For an SAE both are the same tensor; for a transcoder the second is
the MLP's output (its target)."""


@dataclass(frozen=True)
class MultiSplicePlan:
    """Where each SAE sits, in firing order, and which later activations are compared."""

    mode: SpliceMode
    plans: dict[str, SplicePlan]
    """Each SAE's own plan (by SAE name, in the order their hooks fire): its hook, its block and,
    in independent mode, its downstream hooks."""
    start_layer: int | None
    """The earliest SAE's block: the shared prefix stops there. None: an SAE's hook is outside
    the blocks (e.g. ``hook_embed``), so there is no shared prefix."""
    downstream_hooks: tuple[str, ...]
    """Joint mode: the hooks after the latest SAE compared in the one patched run. Independent
    mode: the union of every SAE's downstream hooks (all recorded by the one clean run)."""

    @classmethod
    def of_one(cls, name: str, plan: SplicePlan) -> MultiSplicePlan:
        """A run of one SAE: its plan, its own prefix and downstream hooks."""
        return cls("independent", {name: plan}, plan.start_layer, plan.downstream_hooks)

    @property
    def names(self) -> tuple[str, ...]:
        """SAE names in the order their hooks fire."""
        return tuple(self.plans)

    @property
    def prefix_plan(self) -> SplicePlan:
        """The earliest SAE's plan with the shared prefix's block: where ``run_prefix`` stops."""
        return dataclasses.replace(next(iter(self.plans.values())), start_layer=self.start_layer)

    @property
    def recorded_hooks(self) -> list[str]:
        """The hooks a clean run records for the SAEs: each one's input and each transcoder's
        target (``hook_name_out``), in firing order, each once."""
        hooks = (h for p in self.plans.values() for h in (p.hook_name, p.hook_name_out) if h)
        return list(dict.fromkeys(hooks))

    @property
    def last_layer(self) -> int | None:
        """The latest SAE's block (None when a hook is outside the blocks)."""
        layers = [plan.start_layer for plan in self.plans.values()]
        return None if None in layers else max(layer for layer in layers if layer is not None)

    def targets_only_from(self, n_layers: int) -> int | None:
        """The first block of a clean run that only makes targets: the one after the latest
        SAE's block (None: there is none, or a hook is outside the blocks)."""
        last = self.last_layer
        return None if last is None or last + 1 >= n_layers else last + 1


@dataclass
class MultiCleanRun:
    """The one clean run of an independent step; nothing carries grad."""

    acts: dict[str, torch.Tensor]
    """[batch, pos, d_in] activation at each SAE's hook (heads flattened), and [batch, pos,
    d_out] at each transcoder's ``hook_name_out``, by hook name."""
    block_inputs: dict[int, torch.Tensor]
    """[batch, pos, d_model] residual stream entering each SAE's block, by block."""
    final_resid: torch.Tensor | None
    """[batch, pos, d_model] residual after the last block; None when the run stopped early."""
    downstream: dict[str, torch.Tensor]
    """Activation at each downstream hook, by hook name."""
    log_probs: CleanLogProbs | None = None
    """``final_resid``'s log-probabilities, made once for every SAE's KL (None: not made)."""

    def for_joint(self) -> CleanRun:
        """What a joint step's shared terms read: the final residual and the downstream
        activations (``acts`` is empty: in a joint run every SAE reads the patched run)."""
        return CleanRun(torch.empty(0), self.final_resid, self.downstream, self.log_probs)

    def for_sae(self, plan: SplicePlan) -> CleanRun:
        """What a single run of the SAE at ``plan`` would have recorded (and the shared
        log-probabilities, which its KL reads instead of making them again)."""
        recorded = self.final_resid is not None  # a run that stopped early recorded none
        downstream = {name: self.downstream[name] for name in plan.downstream_hooks if recorded}
        target = None if plan.hook_name_out is None else self.acts[plan.hook_name_out]
        acts = self.acts[plan.hook_name]
        return CleanRun(acts, self.final_resid, downstream, self.log_probs, target=target)


@torch.no_grad()
def run_clean_multi(
    model: HookedTransformer,
    prefix: Prefix,
    plan: MultiSplicePlan,
    *,
    full: bool = True,
    inputs: bool = True,
    autocast: torch.dtype | None = None,
) -> MultiCleanRun:
    """The clean run from the shared prefix, recording what every SAE's continuation needs.

    ``full=False``: stop after the latest SAE's block, record no downstream activation.
    ``inputs=False`` (a joint step: the SAEs read the patched run): record neither the SAEs'
    inputs nor their blocks' inputs, only the final residual and the downstream activations.
    ``autocast``: the blocks after the latest SAE's block run under autocast to that dtype.
    """
    acts: dict[str, torch.Tensor] = {}
    block_inputs: dict[str, torch.Tensor] = {}
    downstream: dict[str, torch.Tensor] = {}
    hooks: FwdHooks = []
    if inputs:
        hooks += [(h, partial(_capture, store=acts, flatten=True)) for h in plan.recorded_hooks]
        hooks += [
            (f"blocks.{layer}.hook_resid_pre", partial(_capture, store=block_inputs))
            for layer in _layers(plan)
        ]
    if full:
        hooks += [(name, partial(_capture, store=downstream)) for name in plan.downstream_hooks]
    stop = model.cfg.n_layers if full or plan.last_layer is None else plan.last_layer + 1
    split = plan.targets_only_from(stop) if full and autocast is not None else None
    with model.hooks(fwd_hooks=hooks):
        if split is None or prefix.residual is None:
            resid = run_from(model, prefix, stop)
        else:
            resid = run_from(model, prefix, split)
            with torch.autocast(resid.device.type, dtype=autocast):
                after = dataclasses.replace(prefix, residual=resid, start_layer=split)
                resid = run_from(model, after, stop)
    by_block = {int(name.split(".")[1]): value for name, value in block_inputs.items()}
    return MultiCleanRun(acts, by_block, resid if full else None, downstream)


def run_joint_patched(
    model: HookedTransformer,
    prefix: Prefix,
    plan: MultiSplicePlan,
    splices: Mapping[str, Splice],
    *,
    full: bool = True,
    checkpoint_blocks: bool = False,
) -> PatchedRun:
    """The run from the shared prefix with every SAE's splice (``splices`` by SAE name) at its
    hook; a transcoder's input is kept at ``hook_name`` for its splice at ``hook_name_out``.

    Grad flows through every splice and the activations between them. ``full=False``: stop
    after the latest SAE's block (``final_resid`` is then that block's output). With
    ``checkpoint_blocks`` each block is recomputed in the backward pass unless an SAE's hook
    is inside it (a splice on the residual stream entering a block runs before the block), so
    no SAE's training forward pass runs twice.
    """
    hooks: FwdHooks = []
    for name, one in plan.plans.items():
        inputs: dict[str, torch.Tensor] = {}  # a transcoder's input, kept for its output hook
        if one.hook_name_out is not None:
            hooks.append((one.hook_name, partial(_capture, store=inputs, flatten=True)))
        splice = partial(_splice, fn=splices[name], inputs=inputs, read=one.hook_name)
        hooks.append((one.write_hook, splice))
    captured: dict[str, torch.Tensor] = {}
    stop = model.cfg.n_layers if full or plan.last_layer is None else plan.last_layer + 1
    if checkpoint_blocks and _can_checkpoint(prefix, plan):
        resid = _blocks_checkpointed(model, prefix, plan, hooks, captured, stop)
        return PatchedRun(final_resid=resid, downstream=captured)
    hooks += [(name, partial(_capture, store=captured)) for name in plan.downstream_hooks]
    with model.hooks(fwd_hooks=hooks):
        resid = run_from(model, prefix, stop)
    return PatchedRun(final_resid=resid, downstream=captured)


def _can_checkpoint(prefix: Prefix, plan: MultiSplicePlan) -> bool:
    return (
        torch.is_grad_enabled()
        and prefix.residual is not None
        and all(name.endswith("hook_resid_post") for name in plan.downstream_hooks)
    )


def _blocks_checkpointed(
    model: HookedTransformer,
    prefix: Prefix,
    plan: MultiSplicePlan,
    hooks: FwdHooks,
    captured: dict[str, torch.Tensor],
    stop: int,
) -> torch.Tensor:
    assert prefix.start_layer is not None and prefix.residual is not None
    by_layer = {int(name.split(".")[1]): name for name in plan.downstream_hooks}
    resid = prefix.residual
    for layer in range(prefix.start_layer, stop):
        # A splice on the residual stream entering the block runs before it, so the block
        # itself can still be recomputed; one inside the block runs with it, not recomputed,
        # so no SAE's training forward pass runs twice.
        entering = f"blocks.{layer}.hook_resid_pre"
        for name, hook in hooks:
            if name == entering:
                out = hook(resid, model.hook_dict[entering])
                resid = resid if out is None else out
        inside = [(n, h) for n, h in hooks if n != entering and _block_of(n) == layer]
        if inside:
            with model.hooks(fwd_hooks=inside):
                resid = one_block(model, prefix, layer, resid)
        else:
            resid = checkpoint(one_block, model, prefix, layer, resid, use_reentrant=False)
        if layer in by_layer:
            captured[by_layer[layer]] = resid
    return resid


def _block_of(hook: str | Callable[..., object]) -> int | None:
    parts = hook.split(".") if isinstance(hook, str) else []
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" else None


def _layers(plan: MultiSplicePlan) -> list[int]:
    layers = (p.start_layer for p in plan.plans.values() if p.start_layer is not None)
    return sorted(set(layers))


def _capture(
    act: torch.Tensor, hook: HookPoint, *, store: dict[str, torch.Tensor], flatten: bool = False
) -> None:
    assert hook.name is not None
    store[hook.name] = flatten_heads(act) if flatten else act


def _splice(
    act: torch.Tensor, hook: HookPoint, *, fn: Splice, inputs: dict[str, torch.Tensor], read: str
) -> torch.Tensor:
    replaced = flatten_heads(act)
    return fn(inputs.get(read, replaced), replaced).reshape(act.shape).to(act.dtype)
