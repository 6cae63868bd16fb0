"""What a Hugging Face causal LM is made of, as the HF splice needs it.

A model comes as SAELens' ``HookedProxyLM`` (what ``load_model("AutoModelForCausalLM", ...)``
returns) or as a bare ``transformers`` model; either way the splice works on the
``PreTrainedModel`` inside, whose module paths (``model.layers.14``) are the hook names.
This module finds the decoder layers and the output head, runs one probe forward pass that
records every module's output, and installs forward hooks that are removed even when a run
raises. Nothing here changes the model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.load_model import HookedProxyLM
from transformers import PreTrainedModel

ForwardHook = Callable[[torch.nn.Module, Any, Any], Any]
"""``register_forward_hook``'s function: (module, args, output) → replacement output or None."""

_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_norm")
"""Attribute names of the final norm on the base model in the common decoder families."""

PROBE_LENGTH = 6
"""Tokens in the probe batch (the plan's checks run the model on one such sequence)."""


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face model (bare, or wrapped in ``HookedProxyLM``)."""
    return isinstance(model, (HookedProxyLM, PreTrainedModel))


def hf_model_of(model: Any) -> PreTrainedModel:
    """The ``PreTrainedModel`` of a ``HookedProxyLM`` (or the bare model itself)."""
    inner = model.model if isinstance(model, HookedProxyLM) else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"the model is a {type(model).__name__}; the Hugging Face splice needs a "
            "transformers PreTrainedModel or SAELens' HookedProxyLM around one."
        )
    return inner


def input_device(model: Any) -> torch.device:
    """Where token ids go: the device of the input embedding (the first of a ``device_map``)."""
    weight = hf_model_of(model).get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


def vocab_size(model: Any) -> int:
    """The number of logits per token (the output embedding's width)."""
    hf = hf_model_of(model)
    head = hf.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(hf.config.vocab_size)


def context_limit(model: Any) -> int | None:
    """The longest context the model was built for (None when the config does not say)."""
    config = hf_model_of(model).config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_layers(hf: PreTrainedModel) -> str | None:
    """Module path of the decoder layers: the ``ModuleList`` of ``num_hidden_layers`` modules."""
    n_layers = getattr(hf.config, "num_hidden_layers", None)
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return name
    return None


def find_final_norm(hf: PreTrainedModel) -> str | None:
    """Module path of the norm after the last decoder layer (e.g. ``model.norm``)."""
    base = hf.base_model
    prefix = "" if base is hf else f"{hf.base_model_prefix}."
    for name in _FINAL_NORM_NAMES:
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return prefix + name
    return None


def find_output_head(hf: PreTrainedModel) -> str | None:
    """Module path of the output embedding (``lm_head``)."""
    head = hf.get_output_embeddings()
    if head is None:
        return None
    return next((name for name, module in hf.named_modules() if module is head), None)


def layer_index(hook_name: str, layers_path: str | None) -> tuple[int | None, bool]:
    """(the decoder layer ``hook_name`` belongs to, whether it is that layer's whole output)."""
    if layers_path is None:
        return None, False
    match = re.match(rf"^{re.escape(layers_path)}\.(\d+)(\..+)?$", hook_name)
    if match is None:
        return None, False
    return int(match.group(1)), match.group(2) is None


@dataclass
class ModuleProbe:
    """What one forward pass on ``PROBE_LENGTH`` tokens tells about a model's modules."""

    tokens: torch.Tensor
    """[1, PROBE_LENGTH] the probe's token ids."""
    order: list[str] = field(default_factory=list)
    """Module paths in the order their forward passes returned."""
    outputs: dict[str, Any] = field(default_factory=dict)
    """Each module's (first) output, detached."""
    calls: dict[str, int] = field(default_factory=dict)
    """How often each module ran."""
    logits: torch.Tensor | None = None
    """[1, PROBE_LENGTH, vocab] the model's own logits."""


@torch.no_grad()
def probe_modules(hf: PreTrainedModel) -> ModuleProbe:
    """Run the model once on a few tokens, recording each module's output and call count."""
    vocab = int(hf.config.vocab_size)
    tokens = (torch.arange(1, PROBE_LENGTH + 1) % vocab)[None].to(input_device(hf))
    probe = ModuleProbe(tokens=tokens)

    def record(name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        probe.calls[name] = probe.calls.get(name, 0) + 1
        if name not in probe.outputs:
            probe.order.append(name)
            probe.outputs[name] = _detached(output)

    named = [(name, _bind(record, name)) for name, _ in hf.named_modules() if name]
    with forward_hooks(hf, named):
        output = hf(input_ids=tokens, use_cache=False)
    probe.logits = getattr(output, "logits", None)
    return probe


def _bind(fn: Callable[..., None], name: str) -> ForwardHook:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        fn(name, module, args, output)

    return hook


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detached(item) for item in output)
    return output


def describe_output(output: Any) -> str:
    """A module output in words: ``tensor [1, 6, 576]``, ``tuple(tensor [..], None)``, ..."""
    if isinstance(output, torch.Tensor):
        return f"tensor {list(output.shape)}"
    if isinstance(output, tuple):
        return "tuple(" + ", ".join(describe_output(item) for item in output) + ")"
    return type(output).__name__


def check_module_name(field_name: str, name: str, hf: PreTrainedModel) -> None:
    """Refuse a hook name that is not a module path of the model; suggest the closest ones."""
    names = [n for n, _ in hf.named_modules() if n]
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    example = next((n for n in names if re.search(r"layers?\.\d+$|\.h\.\d+$", n)), names[0])
    raise ValueError(
        f"{field_name}={name!r} is not a module of this Hugging Face model.{hint} Hook names "
        f"of AutoModelForCausalLM models are module paths, e.g. {example!r}; list them with "
        "[name for name, _ in model.named_modules()]."
    )


@contextmanager
def forward_hooks(hf: torch.nn.Module, hooks: Sequence[tuple[str, ForwardHook]]) -> Iterator[None]:
    """Install ``(module path, hook)`` forward hooks for the block; removed even if it raises."""
    handles = []
    try:
        for name, hook in hooks:
            handles.append(hf.get_submodule(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def close_enough(value: torch.Tensor, reference: torch.Tensor, rel: float = 1e-3) -> bool:
    """Whether two runs of the same computation agree (max |difference| within ``rel`` of the
    reference's largest entry): recomputing the same operations in the same dtype gives
    differences of float rounding only."""
    if value.shape != reference.shape:
        return False
    scale = float(reference.detach().abs().max().clamp_min(1e-6))
    return float((value.detach().float() - reference.detach().float()).abs().max()) <= rel * scale
