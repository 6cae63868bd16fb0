"""SAEs in a Hugging Face causal LM: one clean run for all, and a joint patched run (a single
SAE is the one-entry case, ``core.model_splice``).

The counterparts of ``core.multi_splice``'s ``HookedTransformer`` runs, through forward hooks
on module paths (``core.hf_runs``). The runs continue layer by layer from the shared prefix
(the hidden state entering the earliest SAE's decoder layer); a plan without a shared prefix
(``start_layer`` None) runs the whole model from the tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from sae_e2e_plugin.core.hf_modules import ForwardHook, forward_hooks, hf_model_of
from sae_e2e_plugin.core.hf_runs import (
    HFPrefix,
    HFSplicePlan,
    capture_output,
    continue_layers,
    layer_outputs_only,
    run_full,
)
from sae_e2e_plugin.core.multi_splice import MultiCleanRun, MultiSplicePlan, Splice
from sae_e2e_plugin.core.splice import PatchedRun


@torch.no_grad()
def run_clean_multi(
    model: Any,
    prefix: HFPrefix,
    plan: MultiSplicePlan,
    *,
    full: bool = True,
    inputs: bool = True,
    autocast: torch.dtype | None = None,
) -> MultiCleanRun:
    """The clean run from the shared prefix, recording what every SAE's continuation needs
    (``core.multi_splice.run_clean_multi`` for a Hugging Face model: same arguments)."""
    hf, layers_plan = hf_model_of(model), _layers_plan(plan)
    acts: dict[str, torch.Tensor] = {}
    downstream: dict[str, torch.Tensor] = {}
    hooks: list[tuple[str, ForwardHook]] = []
    if inputs:
        hooks += [(h, partial(capture_output, store=acts, name=h)) for h in plan.recorded_hooks]
    if full:
        hooks += [
            (n, partial(capture_output, store=downstream, name=n)) for n in plan.downstream_hooks
        ]
    layer_inputs: dict[int, torch.Tensor] = dict.fromkeys(_layers(plan) if inputs else ())  # type: ignore[arg-type]
    with forward_hooks(hf, hooks):
        if prefix.hidden is None or prefix.start_layer is None or plan.last_layer is None:
            last = None if full else list(plan.plans.values())[-1].write_hook
            final = run_full(hf, layers_plan, prefix.tokens, stop_after=last)
        else:
            stop = layers_plan.n_layers if full else plan.last_layer + 1
            split = plan.targets_only_from(stop) if full and autocast is not None else None
            final = continue_layers(
                hf,
                layers_plan,
                prefix,
                prefix.hidden,
                prefix.start_layer,
                stop=stop if split is None else split,
                layer_inputs=layer_inputs,
            )
            if split is not None:
                with torch.autocast(final.device.type, dtype=autocast):
                    final = continue_layers(hf, layers_plan, prefix, final, split, stop=stop)
    recorded = {k: v for k, v in layer_inputs.items() if v is not None}
    return MultiCleanRun(acts, recorded, final if full else None, downstream)


def run_joint_patched(
    model: Any,
    prefix: HFPrefix,
    plan: MultiSplicePlan,
    splices: Mapping[str, Splice],
    *,
    full: bool = True,
    checkpoint_blocks: bool = False,
) -> PatchedRun:
    """The run from the shared prefix with every SAE's splice on its module's output
    (``splices`` by SAE name; ``core.multi_splice.run_joint_patched``); grad flows through every
    splice and the layers between them.

    ``full=False`` stops after the latest SAE's layer when there is a shared prefix (a model
    without one runs to the end). ``checkpoint_blocks``: every decoder layer from the prefix on
    that holds no SAE is recomputed in the backward pass, when every downstream hook is a
    decoder layer's output.
    """
    hf, layers_plan = hf_model_of(model), _layers_plan(plan)
    captured: dict[str, torch.Tensor] = {}
    hooks: list[tuple[str, ForwardHook]] = []
    for name, one in plan.plans.items():
        inputs: dict[str, torch.Tensor] = {}  # a transcoder's input, kept for its output module
        if one.hook_name_out is not None:
            hooks.append((one.hook_name, partial(capture_output, store=inputs, name=one.hook_name)))
        splice = partial(_splice, fn=splices[name], inputs=inputs, read=one.hook_name)
        hooks.append((one.write_hook, splice))
    hooks += [(n, partial(capture_output, store=captured, name=n)) for n in plan.downstream_hooks]
    with forward_hooks(hf, hooks):
        if prefix.hidden is None or prefix.start_layer is None or plan.last_layer is None:
            final = run_full(hf, layers_plan, prefix.tokens, stop_after=None)
        else:
            stop = layers_plan.n_layers if full else plan.last_layer + 1
            ckpt = checkpoint_blocks and torch.is_grad_enabled()
            ckpt = ckpt and layer_outputs_only(layers_plan, plan.downstream_hooks)
            plain = set(_layers(plan))
            checkpointed = {k for k in range(stop) if k not in plain} if ckpt else set()
            first = prefix.start_layer
            # The layers after the prefix that hold no SAE and are not recomputed whole keep
            # less for the backward pass (core.lean_layers); outputs and gradients are the same.
            lean = set(range(first, stop)) - plain - checkpointed
            final = continue_layers(
                hf,
                layers_plan,
                prefix,
                prefix.hidden,
                first,
                stop=stop,
                checkpointed=checkpointed,
                lean=lean,
            )
    assert final is not None  # a run with no stop reaches the head
    return PatchedRun(final_resid=final, downstream=captured)


def _layers_plan(plan: MultiSplicePlan) -> HFSplicePlan:
    layers_plan = plan.prefix_plan
    assert isinstance(layers_plan, HFSplicePlan)
    return layers_plan


def _layers(plan: MultiSplicePlan) -> list[int]:
    return sorted({p.start_layer for p in plan.plans.values() if p.start_layer is not None})


def _splice(
    module: torch.nn.Module,
    args: Any,
    output: Any,
    *,
    fn: Splice,
    inputs: dict[str, torch.Tensor],
    read: str,
) -> Any:
    acts = output[0] if isinstance(output, tuple) else output
    read_acts = inputs[read] if read in inputs else acts  # an SAE reads what it replaces
    new = fn(read_acts, acts).reshape(acts.shape).to(acts.device, acts.dtype)
    return (new, *output[1:]) if isinstance(output, tuple) else new
