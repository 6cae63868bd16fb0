"""Running a Hugging Face causal LM clean and with an SAE's reconstruction spliced in.

The counterpart of ``core.splice`` for ``model_class_name="AutoModelForCausalLM"`` (SAELens'
``HookedProxyLM`` or a bare ``transformers`` model), with the same plan / prefix / clean /
patched steps. Hook names are module paths (``model.layers.14``); the SAE reads a module's
*output*, and its reconstruction replaces that output through a forward hook.

Shared prefix. The decoder layers of the common families (Llama, Mistral, Qwen2/3, Gemma,
Phi-3, OLMo, GPT-2, ...) are called one after another as ``layer(hidden, **kwargs)`` with the
same keyword arguments: the rotary ``position_embeddings``, the causal mask, the position ids.
``run_hf_prefix`` runs the embeddings and the layers before the hook's layer once and keeps
the hidden state entering that layer together with the keyword arguments the model called it
with (read by a forward pre-hook, so they are exactly the model's own); the clean and patched
runs continue from there layer by layer. The plan uses this only when the decoder layers are
one ``ModuleList``, every layer from the hook's on has the same attention type
(``config.layer_types``: models alternating sliding and full attention give the types different
masks), and on a probe batch the continuation reproduces the model's own output. Otherwise the
clean and patched runs are two full runs from the tokens. The plan logs which.

Head. The KL is taken from the hidden state after the last layer through the model's final
norm and output embedding (and a ``final_logit_softcapping``), a chunk of tokens at a time.
When that head is not found, or does not reproduce the model's logits on the probe batch,
``final_resid`` holds the full logits and the head is the identity (logged as a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel

from sae_e2e_plugin.core.hf_modules import (
    ModuleProbe,
    check_module_name,
    close_enough,
    describe_output,
    find_final_norm,
    find_layers,
    find_output_head,
    hf_model_of,
    layer_index,
    probe_modules,
)
from sae_e2e_plugin.core.hf_runs import HFSplicePlan, apply_head, continue_layers, run_hf_prefix
from sae_e2e_plugin.core.output_hook import check_output_hook, check_output_width
from sae_e2e_plugin.core.splice import refuse_repeated

logger = logging.getLogger(__name__)


def plan_hf_splice(
    model: Any,
    hook_name: str,
    downstream_hooks: Sequence[str] | None,
    *,
    d_in: int | None = None,
    hook_name_out: str | None = None,
    d_out: int | None = None,
) -> HFSplicePlan:
    """Check ``hook_name`` (its width against ``d_in``) and the downstream hooks; plan the runs.

    A transcoder also gives ``hook_name_out`` (and ``d_out``), the module whose output its own
    replaces (``core.output_hook``). ``downstream_hooks=None`` means the output of every decoder
    layer after the replaced module. Raises ValueError naming the field, the value and the fix
    for anything that cannot be spliced.
    """
    hf = hf_model_of(model)
    check_module_name("hook_name", hook_name, hf)
    if hook_name_out is not None:
        check_module_name("hook_name_out", hook_name_out, hf)
    # In eval mode: dropout would make the runs the plan compares differ.
    training = hf.training
    hf.eval()
    try:
        return _plan(hf, hook_name, downstream_hooks, d_in, hook_name_out, d_out)
    finally:
        hf.train(training)


def _plan(
    hf: PreTrainedModel,
    hook_name: str,
    downstream_hooks: Sequence[str] | None,
    d_in: int | None,
    hook_name_out: str | None,
    d_out: int | None,
) -> HFSplicePlan:
    probe = probe_modules(hf)
    first_of_tuple, _ = _check_hook_output("hook_name", hook_name, probe, d_in)
    layers_path = find_layers(hf)
    n_layers = int(getattr(hf.config, "num_hidden_layers", 0) or 0)
    layer, whole = layer_index(hook_name, layers_path)
    if hook_name_out is not None:
        first_of_tuple, width = _check_hook_output("hook_name_out", hook_name_out, probe, None)
        check_output_width(hook_name_out, width, d_out, "module")
        block_of = partial(_layer_of, layers_path=layers_path)
        check_output_hook(hook_name, hook_name_out, probe.order, block_of)
        whole = layer_index(hook_name_out, layers_path)[1]  # of the module replaced
    _refuse_hooks_after_layers(hook_name, probe, layers_path, n_layers)
    write_hook = hook_name_out or hook_name
    position = probe.order.index(write_hook)
    downstream = _downstream(
        hf, probe, write_hook, position, layers_path, n_layers, downstream_hooks
    )
    norm_path, head_path = find_final_norm(hf), find_output_head(hf)
    plan = HFSplicePlan(
        hook_name=hook_name,
        start_layer=layer,
        downstream_hooks=downstream,
        layers_path=layers_path,
        n_layers=n_layers,
        hook_is_layer_output=whole,
        first_of_tuple=first_of_tuple,
        norm_path=norm_path if head_path else None,
        head_path=head_path if norm_path else None,
        softcap=getattr(hf.config, "final_logit_softcapping", None),
        hook_name_out=hook_name_out,
    )
    plan = _checked_head(hf, plan, probe)
    return _checked_prefix(hf, plan, probe)


def _layer_of(hook_name: str, layers_path: str | None) -> int | None:
    return layer_index(hook_name, layers_path)[0]


def _check_hook_output(
    field: str, hook_name: str, probe: ModuleProbe, d_in: int | None
) -> tuple[bool, int]:
    """Whether the module returns ``(tensor, None, ...)``, and the tensor's width."""
    if hook_name not in probe.outputs:
        raise ValueError(
            f"{field}={hook_name!r} is a module of the model, but it does not run in a forward "
            "pass, so there is nothing to read or replace. Choose a module that runs, e.g. a "
            "decoder layer."
        )
    if probe.calls[hook_name] > 1:
        raise ValueError(
            f"{field}={hook_name!r} runs {probe.calls[hook_name]} times per forward pass (a "
            "shared module); the splice could not tell which call to replace. Hook a module "
            "that runs once, e.g. a decoder layer."
        )
    output: Any = probe.outputs[hook_name]
    first_of_tuple = (
        isinstance(output, tuple)
        and len(output) > 0
        and isinstance(output[0], torch.Tensor)
        and all(item is None for item in output[1:])
    )
    acts = next(iter(output)) if first_of_tuple else output
    if not isinstance(acts, torch.Tensor) or acts.ndim != 3:
        raise ValueError(
            f"{field}={hook_name!r} outputs {describe_output(output)}; the splice replaces one "
            "[batch, pos, width] tensor and cannot tell which element of this output the SAE "
            "should read and replace. Hook a module whose output is one tensor, e.g. the "
            "decoder layer itself or a projection inside it (such as '...self_attn.o_proj')."
        )
    if d_in is not None and acts.shape[-1] != d_in:
        raise ValueError(
            f"sae.d_in is {d_in}, but the output of hook_name={hook_name!r} has width "
            f"{acts.shape[-1]}. Set sae.d_in={acts.shape[-1]} or choose a module of width {d_in}."
        )
    return first_of_tuple, acts.shape[-1]


def _refuse_hooks_after_layers(
    hook_name: str, probe: ModuleProbe, layers_path: str | None, n_layers: int
) -> None:
    last = f"{layers_path}.{n_layers - 1}"
    if layers_path is None or last not in probe.outputs:
        return
    if probe.order.index(hook_name) > probe.order.index(last):
        raise ValueError(
            f"hook_name={hook_name!r} runs after the last decoder layer ({last!r}): it is part of "
            "the output head, which the KL is computed through. Put the SAE at or before "
            f"{last!r}."
        )


def _downstream(
    hf: PreTrainedModel,
    probe: ModuleProbe,
    hook_name: str,
    position: int,
    layers_path: str | None,
    n_layers: int,
    downstream_hooks: Sequence[str] | None,
) -> tuple[str, ...]:
    if downstream_hooks is None:
        layer_outputs = {f"{layers_path}.{k}" for k in range(n_layers)} if layers_path else set()
        later = probe.order[position + 1 :]
        return tuple(name for name in later if name in layer_outputs)
    downstream = tuple(downstream_hooks)
    for name in downstream:
        check_module_name("downstream_hooks", name, hf)
        if name not in probe.outputs or probe.order.index(name) <= position:
            raise ValueError(
                f"downstream_hooks contains {name!r}, which does not run after "
                f"{hook_name!r}, the module the SAE replaces; the SAE cannot change it. Use "
                "modules that run later, "
                "or leave downstream_hooks unset for every later decoder layer's output."
            )
        if not isinstance(probe.outputs[name], torch.Tensor):
            raise ValueError(
                f"downstream_hooks contains {name!r}, whose output is "
                f"{describe_output(probe.outputs[name])}, not one tensor; compare decoder layers' "
                "outputs or other modules that return one tensor."
            )
    refuse_repeated("downstream_hooks", downstream, "module")
    return downstream


def _checked_head(hf: PreTrainedModel, plan: HFSplicePlan, probe: ModuleProbe) -> HFSplicePlan:
    last = f"{plan.layers_path}.{plan.n_layers - 1}"
    final = probe.outputs.get(last)
    final = final[0] if isinstance(final, tuple) else final
    reason = None
    if plan.head_path is None:
        reason = "no final norm and output embedding were found"
    elif probe.logits is None:
        reason = "its forward pass returns no logits to check the head against"
    elif not isinstance(final, torch.Tensor):
        reason = "its last decoder layer's output could not be read"
    elif not close_enough(apply_head(hf, plan, final), probe.logits, rel=1e-4):
        reason = f"{plan.norm_path} + {plan.head_path} do not reproduce the model's logits"
    if reason is None:
        return plan
    if probe.logits is None:
        raise ValueError(
            f"model_class_name='AutoModelForCausalLM', but this {type(hf).__name__} has no output "
            f"head the splice can use ({reason}) and its forward pass returns no logits, so there "
            "is no next-token distribution to compute the KL from. Load a causal language model "
            "(transformers' AutoModelForCausalLM, whose output has .logits), not a base model."
        )
    logger.warning(
        f"the KL of this model is computed from full logits ({reason}): every step holds "
        "[batch, pos, vocab] logits of the clean and the patched run in memory."
    )
    return replace(plan, norm_path=None, head_path=None)


def _checked_prefix(hf: PreTrainedModel, plan: HFSplicePlan, probe: ModuleProbe) -> HFSplicePlan:
    reason = _no_prefix_reason(hf, plan, probe)
    if reason is not None:
        logger.info(
            f"hook_name={plan.hook_name!r}: no shared prefix ({reason}); the clean and the "
            "patched run are two full runs of the model from the tokens."
        )
        return replace(plan, start_layer=None)
    logger.info(
        f"hook_name={plan.hook_name!r}: shared prefix: the embeddings and decoder layers "
        f"0..{plan.start_layer - 1 if plan.start_layer else -1} run once per batch; the clean "
        f"and patched runs continue from {plan.layers_path}.{plan.start_layer} with the "
        "model's own position embeddings and mask."
    )
    return plan


def _no_prefix_reason(hf: PreTrainedModel, plan: HFSplicePlan, probe: ModuleProbe) -> str | None:
    if plan.start_layer is None:
        return "the hook is not inside a decoder layer" if plan.layers_path else "no decoder layers"
    if plan.head_path is None:
        return "the output head was not found: the logits come from whole runs of the model"
    layer_types = getattr(hf.config, "layer_types", None)
    if layer_types and len(set(layer_types[plan.start_layer :])) > 1:
        kinds = sorted(set(layer_types[plan.start_layer :]))
        return f"the later layers mix attention types {kinds}, each with its own mask"
    last = probe.outputs.get(f"{plan.layers_path}.{plan.n_layers - 1}")
    last = last[0] if isinstance(last, tuple) else last
    try:
        with torch.no_grad():
            prefix = run_hf_prefix(hf, probe.tokens, plan)
            final = continue_layers(hf, plan, prefix, prefix.hidden, plan.start_layer)
    except Exception as error:  # a layer that cannot be called on its own
        return f"its decoder layers cannot be run one by one ({type(error).__name__}: {error})"
    if not isinstance(last, torch.Tensor) or not close_enough(final, last):
        return "running its decoder layers one by one does not reproduce the model's output"
    return None
