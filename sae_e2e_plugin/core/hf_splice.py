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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from sae_e2e_plugin.core.hf_modules import (
    ForwardHook,
    ModuleProbe,
    check_module_name,
    close_enough,
    describe_output,
    find_final_norm,
    find_layers,
    find_output_head,
    forward_hooks,
    hf_model_of,
    input_device,
    layer_index,
    probe_modules,
)
from sae_e2e_plugin.core.splice import CleanRun, PatchedRun, SplicePlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFSplicePlan(SplicePlan):
    """A ``SplicePlan`` for a Hugging Face model (``start_layer`` None: two full runs)."""

    layers_path: str | None
    """Module path of the decoder layers (e.g. ``model.layers``); None when not found."""
    n_layers: int
    """Number of decoder layers."""
    hook_is_layer_output: bool
    """Whether ``hook_name`` is a whole decoder layer (its output is the next layer's input)."""
    first_of_tuple: bool
    """Whether the hook's module returns ``(tensor, None, ...)``, whose tensor is replaced."""
    norm_path: str | None
    """The final norm of the head; None (with ``head_path``): the KL uses full logits."""
    head_path: str | None
    """The output embedding (``lm_head``)."""
    softcap: float | None
    """``config.final_logit_softcapping`` (Gemma 2), applied after the output embedding."""


@dataclass
class HFPrefix:
    """The state entering decoder layer ``start_layer``, shared by the clean and patched runs."""

    tokens: torch.Tensor
    """[batch, pos] token ids."""
    hidden: torch.Tensor | None
    """[batch, pos, d_model] hidden state entering ``start_layer`` (None: full runs)."""
    start_layer: int | None
    layer_kwargs: dict[str, Any]
    """The keyword arguments the model passes each decoder layer (position embeddings, mask)."""


def plan_hf_splice(
    model: Any,
    hook_name: str,
    downstream_hooks: Sequence[str] | None,
    *,
    d_in: int | None = None,
) -> HFSplicePlan:
    """Check ``hook_name`` (its width against ``d_in``) and the downstream hooks; plan the runs.

    ``downstream_hooks=None`` means the output of every decoder layer after the hook. Raises
    ValueError naming the field, the value and the fix for anything that cannot be spliced.
    """
    hf = hf_model_of(model)
    check_module_name("hook_name", hook_name, hf)
    probe = probe_modules(hf)
    first_of_tuple = _check_hook_output(hook_name, probe, d_in)
    layers_path = find_layers(hf)
    n_layers = int(getattr(hf.config, "num_hidden_layers", 0) or 0)
    layer, whole = layer_index(hook_name, layers_path)
    _refuse_hooks_after_layers(hook_name, probe, layers_path, n_layers)
    position = probe.order.index(hook_name)
    downstream = _downstream(
        hf, probe, hook_name, position, layers_path, n_layers, downstream_hooks
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
    )
    plan = _checked_head(hf, plan, probe)
    return _checked_prefix(hf, plan, probe)


def _check_hook_output(hook_name: str, probe: ModuleProbe, d_in: int | None) -> bool:
    if hook_name not in probe.outputs:
        raise ValueError(
            f"hook_name={hook_name!r} is a module of the model, but it does not run in a forward "
            "pass, so there is nothing to read or replace. Choose a module that runs, e.g. a "
            "decoder layer."
        )
    if probe.calls[hook_name] > 1:
        raise ValueError(
            f"hook_name={hook_name!r} runs {probe.calls[hook_name]} times per forward pass (a "
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
            f"hook_name={hook_name!r} outputs {describe_output(output)}; the splice replaces one "
            "[batch, pos, width] tensor and cannot tell which element of this output the SAE "
            "should read and replace. Hook a module whose output is one tensor, e.g. the "
            "decoder layer itself or a projection inside it (such as '...self_attn.o_proj')."
        )
    if d_in is not None and acts.shape[-1] != d_in:
        raise ValueError(
            f"sae.d_in is {d_in}, but the output of hook_name={hook_name!r} has width "
            f"{acts.shape[-1]}. Set sae.d_in={acts.shape[-1]} or choose a module of width {d_in}."
        )
    return first_of_tuple


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
                f"hook_name={hook_name!r}; the SAE cannot change it. Use modules that run later, "
                "or leave downstream_hooks unset for every later decoder layer's output."
            )
        if not isinstance(probe.outputs[name], torch.Tensor):
            raise ValueError(
                f"downstream_hooks contains {name!r}, whose output is "
                f"{describe_output(probe.outputs[name])}, not one tensor; compare decoder layers' "
                "outputs or other modules that return one tensor."
            )
    if len(set(downstream)) != len(downstream):
        raise ValueError(f"downstream_hooks lists a module twice: {list(downstream)}.")
    return downstream


def _checked_head(hf: PreTrainedModel, plan: HFSplicePlan, probe: ModuleProbe) -> HFSplicePlan:
    last = f"{plan.layers_path}.{plan.n_layers - 1}"
    final = probe.outputs.get(last)
    final = final[0] if isinstance(final, tuple) else final
    reason = None
    if plan.head_path is None:
        reason = "no final norm and output embedding were found"
    elif probe.logits is None or not isinstance(final, torch.Tensor):
        reason = "the model's logits or its last decoder layer could not be read"
    elif not close_enough(_apply_head(hf, plan, final), probe.logits, rel=1e-4):
        reason = f"{plan.norm_path} + {plan.head_path} do not reproduce the model's logits"
    if reason is None:
        return plan
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
    layer_types = getattr(hf.config, "layer_types", None)
    if layer_types and len(set(layer_types[plan.start_layer :])) > 1:
        kinds = sorted(set(layer_types[plan.start_layer :]))
        return f"the later layers mix attention types {kinds}, each with its own mask"
    last = probe.outputs.get(f"{plan.layers_path}.{plan.n_layers - 1}")
    last = last[0] if isinstance(last, tuple) else last
    try:
        with torch.no_grad():
            prefix = run_hf_prefix(hf, probe.tokens, plan)
            final = _continue(hf, plan, prefix, prefix.hidden, plan.start_layer)
    except Exception as error:  # a layer that cannot be called on its own
        return f"its decoder layers cannot be run one by one ({type(error).__name__}: {error})"
    if not isinstance(last, torch.Tensor) or not close_enough(final, last):
        return "running its decoder layers one by one does not reproduce the model's output"
    return None


class _StopForward(Exception):
    """Raised by the prefix's pre-hook: the rest of the model is not needed."""


@jaxtyped(typechecker=beartype)
@torch.no_grad()
def run_hf_prefix(
    model: Any, tokens: Int[torch.Tensor, "batch pos"], plan: HFSplicePlan
) -> HFPrefix:
    """Embed the tokens and run the decoder layers before ``plan.start_layer`` once, no grad."""
    if plan.start_layer is None:
        return HFPrefix(tokens, None, None, {})
    hf = hf_model_of(model)
    captured: dict[str, Any] = {}

    def stop(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    layer = _layers(hf, plan)[plan.start_layer]
    handle = layer.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        hf.base_model(input_ids=tokens.to(input_device(hf)), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return HFPrefix(tokens, captured["hidden"], plan.start_layer, captured["kwargs"])


@torch.no_grad()
def run_hf_clean(
    model: Any, prefix: HFPrefix, plan: HFSplicePlan, *, full: bool = True
) -> CleanRun:
    """The unpatched run: the SAE's input, the final hidden state, downstream activations.

    With ``full=False`` the run stops after the SAE's module and records nothing downstream.
    """
    hf = hf_model_of(model)
    captured: dict[str, torch.Tensor] = {}
    hooks = [(plan.hook_name, partial(_capture, store=captured, name=plan.hook_name))]
    if full:
        hooks += [(n, partial(_capture, store=captured, name=n)) for n in plan.downstream_hooks]
    final: torch.Tensor | None = None
    with forward_hooks(hf, hooks):
        if prefix.hidden is not None and prefix.start_layer is not None:
            stop = plan.n_layers if full else prefix.start_layer + 1
            final = _continue(hf, plan, prefix, prefix.hidden, prefix.start_layer, stop=stop)
        else:
            final = _full_run(hf, plan, prefix.tokens, stop_after=None if full else plan.hook_name)
    acts = captured.pop(plan.hook_name)
    return CleanRun(acts=acts, final_resid=final if full else None, downstream=captured)


@jaxtyped(typechecker=beartype)
def run_hf_patched(
    model: Any,
    prefix: HFPrefix,
    plan: HFSplicePlan,
    replacement: Float[torch.Tensor, "batch pos d_in"],
    *,
    checkpoint_blocks: bool = False,
) -> PatchedRun:
    """The run with ``replacement`` [batch, pos, d_in] as the hook module's output.

    Grad flows back into ``replacement`` only (the model is frozen, the prefix has no grad).
    ``checkpoint_blocks=True`` recomputes each decoder layer after the hook's in the backward
    pass (activation checkpointing) when there is a shared prefix and every downstream hook
    is a decoder layer's output.
    """
    hf = hf_model_of(model)
    captured: dict[str, torch.Tensor] = {}
    hooks: list[tuple[str, ForwardHook]] = [
        (n, partial(_capture, store=captured, name=n)) for n in plan.downstream_hooks
    ]
    if prefix.hidden is None or prefix.start_layer is None:
        hooks.append((plan.hook_name, partial(_replace, replacement=replacement)))
        with forward_hooks(hf, hooks):
            final = _full_run(hf, plan, prefix.tokens, stop_after=None)
        assert final is not None  # a run with no stop reaches the head
        return PatchedRun(final_resid=final, downstream=captured)
    ckpt = checkpoint_blocks and torch.is_grad_enabled() and _layer_outputs_only(plan)
    layer = prefix.start_layer
    with forward_hooks(hf, hooks):
        if plan.hook_is_layer_output:  # the replacement is the next layer's input
            hidden = replacement.to(prefix.hidden.device, prefix.hidden.dtype)
        else:  # the hook is inside the layer: run it with the splice hook, not checkpointed
            with forward_hooks(hf, [(plan.hook_name, partial(_replace, replacement=replacement))]):
                hidden = _call_layer(_layers(hf, plan)[layer], prefix.hidden, prefix.layer_kwargs)
        final = _continue(hf, plan, prefix, hidden, layer + 1, checkpoint_layers=ckpt)
    return PatchedRun(final_resid=final, downstream=captured)


def hf_head(model: Any, plan: HFSplicePlan) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head as a function: final hidden states [tokens, d_model] → logits [tokens, vocab]
    (the identity when the plan computes the KL from full logits)."""
    if plan.head_path is None:
        return _identity
    return partial(_apply_head, hf_model_of(model), plan)


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def _apply_head(hf: PreTrainedModel, plan: HFSplicePlan, hidden: torch.Tensor) -> torch.Tensor:
    assert plan.norm_path is not None and plan.head_path is not None
    logits = hf.get_submodule(plan.head_path)(hf.get_submodule(plan.norm_path)(hidden))
    if plan.softcap:
        logits = plan.softcap * torch.tanh(logits / plan.softcap)
    return logits


def _layers(hf: PreTrainedModel, plan: HFSplicePlan) -> torch.nn.ModuleList:
    assert plan.layers_path is not None
    layers = hf.get_submodule(plan.layers_path)
    assert isinstance(layers, torch.nn.ModuleList)
    return layers


def _call_layer(
    layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    # transformers 5.x decoder layers return the hidden state; older ones (hidden, ...).
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _continue(
    hf: PreTrainedModel,
    plan: HFSplicePlan,
    prefix: HFPrefix,
    hidden: Any,
    first: int | None,
    *,
    stop: int | None = None,
    checkpoint_layers: bool = False,
) -> torch.Tensor:
    """Decoder layers ``first`` .. ``stop - 1`` on ``hidden``; the result on the head's device."""
    assert first is not None and isinstance(hidden, torch.Tensor)
    layers = _layers(hf, plan)
    for k in range(first, plan.n_layers if stop is None else stop):
        if checkpoint_layers:
            hidden = checkpoint(
                _call_layer, layers[k], hidden, prefix.layer_kwargs, use_reentrant=False
            )
        else:
            hidden = _call_layer(layers[k], hidden, prefix.layer_kwargs)
    return _to_head_device(hf, plan, hidden)


def _full_run(
    hf: PreTrainedModel, plan: HFSplicePlan, tokens: torch.Tensor, stop_after: str | None
) -> torch.Tensor | None:
    """A run from the tokens: the hidden state entering the final norm (full logits when the
    head was not found); None when it stops after the module ``stop_after``."""
    tokens = tokens.to(input_device(hf))
    captured: dict[str, torch.Tensor] = {}
    hooks: list[tuple[str, ForwardHook]] = []
    if stop_after is not None:
        hooks.append((stop_after, _stop))
    elif plan.norm_path is not None:
        hooks.append((plan.norm_path, partial(_capture_input, store=captured)))
    try:
        with forward_hooks(hf, hooks):
            if plan.head_path is None and stop_after is None:
                return hf(input_ids=tokens, use_cache=False).logits
            hf.base_model(input_ids=tokens, use_cache=False)
    except _StopForward:
        return None
    return _to_head_device(hf, plan, captured["final"])


def _to_head_device(hf: PreTrainedModel, plan: HFSplicePlan, hidden: torch.Tensor) -> torch.Tensor:
    # With a device_map the last layer and the head may sit on different devices.
    if plan.head_path is None:
        return hidden
    weight = getattr(hf.get_submodule(plan.head_path), "weight", None)
    return hidden if weight is None else hidden.to(weight.device)


def _layer_outputs_only(plan: HFSplicePlan) -> bool:
    layer_outputs = {f"{plan.layers_path}.{k}" for k in range(plan.n_layers)}
    return all(name in layer_outputs for name in plan.downstream_hooks)


def _stop(module: torch.nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


def _capture_input(
    module: torch.nn.Module, args: Any, output: Any, *, store: dict[str, Any]
) -> None:
    store["final"] = args[0]


def _capture(
    module: torch.nn.Module, args: Any, output: Any, *, store: dict[str, Any], name: str
) -> None:
    store[name] = output[0] if isinstance(output, tuple) else output


def _replace(module: torch.nn.Module, args: Any, output: Any, *, replacement: torch.Tensor) -> Any:
    acts = output[0] if isinstance(output, tuple) else output
    new = replacement.reshape(acts.shape).to(acts.device, acts.dtype)
    return (new, *output[1:]) if isinstance(output, tuple) else new
