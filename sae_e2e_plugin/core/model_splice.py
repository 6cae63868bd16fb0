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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped

from sae_e2e_plugin.core import hf_modules, hf_multi, hf_runs, hf_splice, multi_splice, splice
from sae_e2e_plugin.core.multi_splice import MultiCleanRun, MultiSplicePlan, Splice, SpliceMode
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
    hook_name_out: str | None = None,
    d_out: int | None = None,
) -> SplicePlan:
    """The model's hook (a transcoder's two hooks) and downstream hooks checked; where the
    shared prefix stops."""
    plan = hf_splice.plan_hf_splice if hf_modules.is_hf_model(model) else splice.plan_splice
    return plan(
        model, hook_name, downstream_hooks, d_in=d_in, hook_name_out=hook_name_out, d_out=d_out
    )


def run_prefix(model: Any, tokens: torch.Tensor, plan: SplicePlan | MultiSplicePlan) -> Any:
    """The state shared by the clean and patched runs (``splice.Prefix`` / ``hf_splice.HFPrefix``);
    for several SAEs, up to the earliest SAE's block."""
    if isinstance(plan, MultiSplicePlan):
        plan = plan.prefix_plan
    if isinstance(plan, hf_runs.HFSplicePlan):
        return hf_runs.run_hf_prefix(model, tokens, plan)
    return splice.run_prefix(model, tokens, plan.start_layer)


def run_clean(model: Any, prefix: Any, plan: SplicePlan, *, full: bool = True) -> CleanRun:
    """The clean run from the prefix (``full=False``: stop after the SAE's block): the clean
    run of a run of one SAE."""
    one = MultiSplicePlan.of_one(_ONE, plan)
    return run_clean_multi(model, prefix, one, full=full).for_sae(plan)


@jaxtyped(typechecker=beartype)
def run_patched(
    model: Any,
    prefix: Any,
    plan: SplicePlan,
    replacement: Float[torch.Tensor, "batch pos d_write"],
    *,
    checkpoint_blocks: bool = False,
) -> PatchedRun:
    """The run with ``replacement`` [batch, pos, width] spliced in at ``plan.write_hook`` (an
    SAE's hook, [batch, pos, d_in]; a transcoder's ``hook_name_out``, [batch, pos, d_out]): the
    joint run of one splice that returns ``replacement``.

    Grad flows from the outputs back into ``replacement`` only: the model is frozen and the
    prefix was computed without grad. ``checkpoint_blocks=True`` recomputes each later block
    in the backward pass instead of keeping its activations (attention patterns, MLP hidden
    states: most of a step's memory on long contexts) at the cost of one more forward of those
    blocks, when the run has a shared prefix and every downstream hook is a block's output.
    """
    one = MultiSplicePlan.of_one(_ONE, plan)
    splices = {_ONE: partial(_constant, replacement)}
    prefix = _after_layer_output(prefix, plan, replacement)
    return run_joint_patched(model, prefix, one, splices, checkpoint_blocks=checkpoint_blocks)


_ONE = "sae"


def _constant(
    replacement: torch.Tensor, read: torch.Tensor, replaced: torch.Tensor
) -> torch.Tensor:
    return replacement


def _after_layer_output(prefix: Any, plan: SplicePlan, replacement: torch.Tensor) -> Any:
    # A Hugging Face SAE on a whole decoder layer replaces that layer's output, which is the next
    # layer's input: the patched run starts there and the layer itself is not run at all.
    if not isinstance(plan, hf_runs.HFSplicePlan) or not plan.hook_is_layer_output:
        return prefix
    if prefix.hidden is None or prefix.start_layer is None:
        return prefix
    hidden = replacement.to(prefix.hidden.device, prefix.hidden.dtype)
    return dataclasses.replace(prefix, hidden=hidden, start_layer=prefix.start_layer + 1)


def model_head(
    model: Any, plan: SplicePlan | MultiSplicePlan, *, autocast: torch.dtype | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head: a run's ``final_resid`` rows [tokens, d] → logits [tokens, vocab];
    ``autocast``: run under autocast to that dtype (a clean run's head at lower precision)."""
    if isinstance(plan, MultiSplicePlan):
        plan = plan.prefix_plan
    if isinstance(plan, hf_runs.HFSplicePlan):
        head = hf_runs.hf_head(model, plan)
    else:
        head = splice.model_head(model)
    return head if autocast is None else partial(_autocast, head, autocast)


def _autocast(
    head: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, rows: torch.Tensor
) -> torch.Tensor:
    with torch.autocast(rows.device.type, dtype=dtype):
        return head(rows)


def plan_multi_splice(
    model: Any,
    hook_names: Mapping[str, str],
    d_ins: Mapping[str, int],
    mode: SpliceMode,
    downstream_hooks: Sequence[str] | None,
    outputs: Mapping[str, tuple[str, int]] | None = None,
) -> MultiSplicePlan:
    """Check every SAE's hook and width against the model and plan the runs.

    ``outputs``: each transcoder's ``(hook_name_out, d_out)`` by SAE name (``core.output_hook``).

    ``downstream_hooks=()`` records none; None means every residual-stream hook (decoder layer
    output) after the latest SAE (joint) or after each SAE's own hook (independent). Raises
    ValueError naming the SAE, the value and the fix.
    """
    if mode not in ("joint", "independent"):
        raise ValueError(f"splice={mode!r} is not a splice mode; use 'joint' or 'independent'.")
    outputs = dict(outputs or {})
    if mode == "joint":
        _refuse_shared_hooks(hook_names)
        _refuse_shared_hooks({n: outputs.get(n, (hook, 0))[0] for n, hook in hook_names.items()})
    own = downstream_hooks if mode == "independent" else ()
    plans = {
        name: _plan_one(model, name, hook, d_ins[name], own, outputs.get(name))
        for name, hook in hook_names.items()
    }
    order = _firing_order(model)
    plans = dict(sorted(plans.items(), key=lambda item: order.index(item[1].hook_name)))
    layers = [plan.start_layer for plan in plans.values()]
    start_layer = None if None in layers else min(layer for layer in layers if layer is not None)
    if mode == "joint":  # compared after the hook replaced last
        latest_name = max(plans, key=lambda name: order.index(plans[name].write_hook))
        latest = plans[latest_name]
        out = None if latest.hook_name_out is None else (latest.hook_name_out, None)
        downstream = _plan_one(
            model,
            latest_name,
            latest.hook_name,
            None,
            downstream_hooks,
            out,
        ).downstream_hooks
    else:
        downstream = tuple(
            dict.fromkeys(h for plan in plans.values() for h in plan.downstream_hooks)
        )
    return MultiSplicePlan(mode, plans, start_layer, downstream)


def _firing_order(model: Any) -> list[str]:
    if hf_modules.is_hf_model(model):
        return list(hf_modules.probe_modules(hf_modules.hf_model_of(model)).order)
    return list(splice.probe_hooks(model).order)


def _refuse_shared_hooks(hook_names: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, hook in hook_names.items():
        if hook in seen:
            raise ValueError(
                f"SAEs {seen[hook]!r} and {name!r} both sit at hook_names={hook!r}; in "
                "splice='joint' one activation can be replaced by one SAE only. Move one SAE "
                "to another hook, or use splice='independent' (each SAE spliced alone)."
            )
        seen[hook] = name


def _plan_one(
    model: Any,
    name: str,
    hook: str,
    d_in: int | None,
    downstream_hooks: Sequence[str] | None,
    output: tuple[str, int | None] | None = None,
) -> SplicePlan:
    hook_out, d_out = output or (None, None)
    try:
        return plan_splice(
            model, hook, downstream_hooks, d_in=d_in, hook_name_out=hook_out, d_out=d_out
        )
    except ValueError as error:
        raise naming_the_sae(error, name) from None


def naming_the_sae(error: ValueError, name: str) -> ValueError:
    """A single-SAE check's error with its fields (``sae.d_in``, ``hook_name``) named as the
    fields of SAE ``name`` in a run of several (``saes[name].d_in``, ``hook_names[name]``)."""
    message = str(error)
    for field in ("d_in", "d_out"):
        message = message.replace(f"sae.{field}", f"saes[{name!r}].{field}")
    for field, per_sae in (("hook_name", "hook_names"), ("hook_name_out", "hook_names_out")):
        message = message.replace(f"{field}=", f"{per_sae}[{name!r}]=")
    return ValueError(f"SAE {name!r}: {message}")


def run_clean_multi(
    model: Any,
    prefix: Any,
    plan: MultiSplicePlan,
    *,
    full: bool = True,
    inputs: bool = True,
    autocast: torch.dtype | None = None,
) -> MultiCleanRun:
    """The clean run from the shared prefix, recording every SAE's input and its block's input
    (``inputs=False``: neither), and with ``full`` the final residual and downstream activations.

    ``autocast``: the blocks after the latest SAE's block, which only make targets (final
    residual, downstream activations), run under autocast to that dtype; every SAE's input and
    its block's input come from the blocks before, in the model's dtype."""
    if isinstance(prefix, hf_runs.HFPrefix):
        return hf_multi.run_clean_multi(
            model, prefix, plan, full=full, inputs=inputs, autocast=autocast
        )
    return multi_splice.run_clean_multi(
        model, prefix, plan, full=full, inputs=inputs, autocast=autocast
    )


def prefix_for(prefix: Any, clean: MultiCleanRun, plan: SplicePlan) -> Any:
    """The prefix a single run of the SAE at ``plan`` would start from: the shared one moved on
    to the SAE's block with the clean state entering it (a HookedTransformer's residual stream,
    a Hugging Face model's hidden state)."""
    state = "hidden" if isinstance(prefix, hf_runs.HFPrefix) else "residual"
    if plan.start_layer in (None, prefix.start_layer) or getattr(prefix, state) is None:
        return prefix
    entering = clean.block_inputs[plan.start_layer]
    return dataclasses.replace(prefix, start_layer=plan.start_layer, **{state: entering})


def run_joint_patched(
    model: Any,
    prefix: Any,
    plan: MultiSplicePlan,
    splices: Mapping[str, Splice],
    *,
    full: bool = True,
    checkpoint_blocks: bool = False,
) -> PatchedRun:
    """The run with every SAE's splice at its hook (``splices`` by SAE name), grad through all;
    ``checkpoint_blocks``: the blocks holding no SAE are recomputed in the backward pass."""
    if isinstance(prefix, hf_runs.HFPrefix):
        return hf_multi.run_joint_patched(
            model, prefix, plan, splices, full=full, checkpoint_blocks=checkpoint_blocks
        )
    return multi_splice.run_joint_patched(
        model, prefix, plan, splices, full=full, checkpoint_blocks=checkpoint_blocks
    )
