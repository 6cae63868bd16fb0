"""The one place that picks a model's splice: TransformerLens or Hugging Face.

``core.splice`` runs a ``HookedTransformer`` (hook points, ``start_at_layer``);
``core.hf_splice`` runs a Hugging Face causal LM (SAELens' ``HookedProxyLM`` for
``model_class_name="AutoModelForCausalLM"``, or a bare ``transformers`` model) through forward
hooks on module paths. Both have the same steps: plan, shared prefix, clean run, patched run,
head. The training step, the objectives and the evaluation call the functions here and never
ask which kind of model they have; the few facts they need about the model (where tokens go,
the vocabulary, the longest context) come from ``model_facts``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sae_e2e_plugin.core import hf_modules, hf_runs, hf_splice, splice
from sae_e2e_plugin.core.splice import CleanRun, PatchedRun, SplicePlan

SPLICEABLE_MODEL_CLASSES = ("HookedTransformer", "AutoModelForCausalLM")
"""The ``model_class_name`` values whose models the splice runs."""


def check_model_class(model_class_name: str) -> None:
    """Refuse a ``model_class_name`` the splice cannot run, naming what to use instead."""
    if model_class_name in SPLICEABLE_MODEL_CLASSES:
        return
    if model_class_name == "TransformerBridge":
        raise ValueError(
            "model_class_name='TransformerBridge' cannot be loaded by the installed SAELens (its "
            "load_model knows 'HookedTransformer', 'HookedMamba' and 'AutoModelForCausalLM'). "
            "Use model_class_name='AutoModelForCausalLM' for the same Hugging Face model (hook "
            "names are module paths such as 'model.layers.14'), or 'HookedTransformer'."
        )
    raise ValueError(
        f"model_class_name={model_class_name!r} is not supported by end-to-end training: the "
        "splice runs 'HookedTransformer' and 'AutoModelForCausalLM' models. Use one of those."
    )


@dataclass(frozen=True)
class ModelFacts:
    """What the training step and the checks need to know about a model of either kind."""

    device: torch.device
    """Where token ids go (a Hugging Face model's input embedding)."""
    d_vocab: int
    """Logits per token."""
    n_ctx: int | None
    """The longest context the model was built for (None: not stated)."""


def model_facts(model: Any) -> ModelFacts:
    """The ``ModelFacts`` of a ``HookedTransformer`` or a Hugging Face model."""
    if hf_modules.is_hf_model(model):
        return ModelFacts(
            device=hf_modules.input_device(model),
            d_vocab=hf_modules.vocab_size(model),
            n_ctx=hf_modules.context_limit(model),
        )
    return ModelFacts(
        device=torch.device(model.cfg.device), d_vocab=model.cfg.d_vocab, n_ctx=model.cfg.n_ctx
    )


def is_spliceable(model: Any) -> bool:
    """Whether ``model`` is a kind the splice runs."""
    from transformer_lens import HookedTransformer

    return hf_modules.is_hf_model(model) or isinstance(model, HookedTransformer)


def plan_splice(
    model: Any,
    hook_name: str,
    downstream_hooks: Sequence[str] | None,
    *,
    d_in: int | None = None,
) -> SplicePlan:
    """The model's hook and downstream hooks checked; where the shared prefix stops."""
    if hf_modules.is_hf_model(model):
        return hf_splice.plan_hf_splice(model, hook_name, downstream_hooks, d_in=d_in)
    return splice.plan_splice(model, hook_name, downstream_hooks, d_in=d_in)


def run_prefix(model: Any, tokens: torch.Tensor, plan: SplicePlan) -> Any:
    """The state shared by the clean and patched runs (``splice.Prefix`` / ``hf_splice.HFPrefix``)."""
    if isinstance(plan, hf_runs.HFSplicePlan):
        return hf_runs.run_hf_prefix(model, tokens, plan)
    return splice.run_prefix(model, tokens, plan.start_layer)


def run_clean(model: Any, prefix: Any, plan: SplicePlan, *, full: bool = True) -> CleanRun:
    """The clean run from the prefix (``full=False``: stop after the SAE's hook)."""
    if isinstance(plan, hf_runs.HFSplicePlan):
        return hf_runs.run_hf_clean(model, prefix, plan, full=full)
    return splice.run_clean(model, prefix, plan, full=full)


def run_patched(
    model: Any,
    prefix: Any,
    plan: SplicePlan,
    replacement: torch.Tensor,
    *,
    checkpoint_blocks: bool = False,
) -> PatchedRun:
    """The run with ``replacement`` [batch, pos, d_in] spliced in at the hook."""
    if isinstance(plan, hf_runs.HFSplicePlan):
        return hf_runs.run_hf_patched(
            model, prefix, plan, replacement, checkpoint_blocks=checkpoint_blocks
        )
    return splice.run_patched(model, prefix, plan, replacement, checkpoint_blocks=checkpoint_blocks)


def model_head(model: Any, plan: SplicePlan) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head: a run's ``final_resid`` rows [tokens, d] → logits [tokens, vocab]."""
    if isinstance(plan, hf_runs.HFSplicePlan):
        return hf_runs.hf_head(model, plan)
    return splice.model_head(model)
