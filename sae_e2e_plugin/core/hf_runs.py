"""A Hugging Face causal LM's pieces of a run: the shared prefix, the decoder layers from a
hidden state, a full run from the tokens, and the head.

``core.hf_splice`` plans the runs (and says why a model gets a shared prefix or two full runs);
``core.hf_multi`` runs the clean and patched runs from these pieces, for one SAE or several.
Hooks are plain functions bound with ``functools.partial`` and installed with
``hf_modules.forward_hooks``, which removes them even when a run raises."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Int, jaxtyped
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from sae_e2e_plugin.core.hf_modules import ForwardHook, forward_hooks, hf_model_of, input_device
from sae_e2e_plugin.core.lean_attention import lean_attention
from sae_e2e_plugin.core.lean_layers import lean_layers
from sae_e2e_plugin.core.splice import SplicePlan


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


def hf_head(model: Any, plan: HFSplicePlan) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head as a function: final hidden states [tokens, d_model] → logits [tokens, vocab]
    (the identity when the plan computes the KL from full logits)."""
    if plan.head_path is None:
        return _identity
    return partial(apply_head, hf_model_of(model), plan)


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


def apply_head(hf: PreTrainedModel, plan: HFSplicePlan, hidden: torch.Tensor) -> torch.Tensor:
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


def continue_layers(
    hf: PreTrainedModel,
    plan: HFSplicePlan,
    prefix: HFPrefix,
    hidden: Any,
    first: int | None,
    *,
    stop: int | None = None,
    checkpointed: Container[int] = (),
    lean: Iterable[int] = (),
    layer_inputs: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decoder layers ``first`` .. ``stop - 1`` on ``hidden``; the result on the head's device.

    ``checkpointed``: the layers recomputed in the backward pass (activation checkpointing).
    ``lean``: the layers whose elementwise parts are recomputed (``core.lean_layers``).
    Every layer's attention backward pass, where there is one, is ``core.lean_attention``'s.
    ``layer_inputs``: filled with the hidden state entering each layer whose index is a key.
    """
    assert first is not None and isinstance(hidden, torch.Tensor)
    layers = _layers(hf, plan)
    with lean_layers(layers[k] for k in lean), lean_attention(hf):
        for k in range(first, plan.n_layers if stop is None else stop):
            if layer_inputs is not None and k in layer_inputs:
                layer_inputs[k] = hidden
            if k in checkpointed:
                hidden = checkpoint(
                    _call_layer, layers[k], hidden, prefix.layer_kwargs, use_reentrant=False
                )
            else:
                hidden = _call_layer(layers[k], hidden, prefix.layer_kwargs)
    return _to_head_device(hf, plan, hidden)


def run_full(
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


def layer_outputs_only(plan: HFSplicePlan, hooks: Iterable[str]) -> bool:
    """Whether every hook of ``hooks`` is a decoder layer's output (the layers can be checkpointed)."""
    layer_outputs = {f"{plan.layers_path}.{k}" for k in range(plan.n_layers)}
    return all(name in layer_outputs for name in hooks)


def _stop(module: torch.nn.Module, args: Any, output: Any) -> None:
    raise _StopForward


def _capture_input(
    module: torch.nn.Module, args: Any, output: Any, *, store: dict[str, Any]
) -> None:
    store["final"] = args[0]


def capture_output(
    module: torch.nn.Module, args: Any, output: Any, *, store: dict[str, Any], name: str
) -> None:
    store[name] = output[0] if isinstance(output, tuple) else output
