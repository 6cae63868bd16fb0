"""Measuring SAEs spliced into their model on held-out tokens, independent of wandb.

``evaluate_sae`` runs the frozen model three ways on each token batch, from one shared prefix:
clean, with every SAE's reconstruction spliced in, and with those activations zeroed. Each SAE
runs inside the spliced run on the activation arriving at its hook (the splice a joint run
trains with), which for one SAE is the clean activation: one SAE is the one-entry case. Logits
are made a chunk of tokens at a time (``core.losses.chunk_rows``). Running totals are averaged
into an ``EvalResult`` (one SAE) or a ``JointEvalResult`` (several).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, overload

import torch
from einops import rearrange
from sae_lens import SAE
from sae_lens.training.activation_scaler import ActivationScaler

from sae_e2e_plugin.core.losses import chunk_rows, kl_orig_to_patched_sum
from sae_e2e_plugin.core.model_splice import (
    is_spliceable,
    model_facts,
    model_head,
    plan_multi_splice,
    plan_splice,
    run_clean_multi,
    run_joint_patched,
    run_prefix,
)
from sae_e2e_plugin.core.multi_splice import MultiSplicePlan
from sae_e2e_plugin.core.positions import PositionFilter, selected_positions, with_reconstruction
from sae_e2e_plugin.core.splice import SplicePlan, flatten_heads
from sae_e2e_plugin.evaluation.eval_positions import eval_positions
from sae_e2e_plugin.evaluation.metrics import (
    DEFAULT_ALIVE_WINDOW_TOKENS,
    DownstreamMetrics,
    EvalResult,
    JointEvalResult,
    active_features_per_token,
    explained_variance_per_token,
    next_token_targets,
    ratio,
)
from sae_e2e_plugin.evaluation.parts import (
    ce_sum,
    check_sae,
    encode_decode,
    eval_mode,
    resolve_hook_name,
    resolve_hook_name_out,
    token_batches_checked,
)

_ONE = "sae"
"""The name of a lone SAE in the mapping every evaluation runs on."""


@overload
def evaluate_sae(
    sae: SAE[Any],
    model: Any,
    token_batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    hook_name: str | None = ...,
    hook_name_out: str | None = ...,
    downstream_hooks: Sequence[str] | None = ...,
    alive_window_tokens: int | None = ...,
    max_batches: int | None = ...,
    logits_chunk_size: int = ...,
    activation_scaler: ActivationScaler | None = ...,
    positions: PositionFilter | Sequence[int | None] | None = ...,
    seqpos_slice: Sequence[int | None] | None = ...,
    exclude_special_tokens: bool | Sequence[int] | None = ...,
) -> EvalResult: ...


@overload
def evaluate_sae(
    sae: Mapping[str, SAE[Any]],
    model: Any,
    token_batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    hook_names: Mapping[str, str] | None = ...,
    downstream_hooks: Sequence[str] | None = ...,
    alive_window_tokens: int | None = ...,
    max_batches: int | None = ...,
    logits_chunk_size: int = ...,
    positions: PositionFilter | Sequence[int | None] | None = ...,
    seqpos_slice: Sequence[int | None] | None = ...,
    exclude_special_tokens: bool | Sequence[int] | None = ...,
) -> JointEvalResult: ...


@torch.no_grad()
def evaluate_sae(
    sae: SAE[Any] | Mapping[str, SAE[Any]],
    model: Any,
    token_batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    hook_name: str | None = None,
    hook_name_out: str | None = None,
    hook_names: Mapping[str, str] | None = None,
    downstream_hooks: Sequence[str] | None = None,
    alive_window_tokens: int | None = DEFAULT_ALIVE_WINDOW_TOKENS,
    max_batches: int | None = None,
    logits_chunk_size: int = 1024,
    activation_scaler: ActivationScaler | None = None,
    positions: PositionFilter | Sequence[int | None] | None = None,
    seqpos_slice: Sequence[int | None] | None = None,
    exclude_special_tokens: bool | Sequence[int] | None = None,
) -> EvalResult | JointEvalResult:
    """Evaluate ``sae`` spliced into ``model`` on held-out ``(batch, pos)`` token batches.

    Args:
        sae: any SAELens ``SAE`` or ``TrainingSAE``; its own ``encode``/``decode`` are
            used, so its architecture, ``apply_b_dec_to_input`` and run-time
            normalisation apply as they do in the SAE. Put in eval mode for the
            evaluation; its previous mode is restored afterwards (so is the model's).
            Several SAEs ``{name: SAE}``: all spliced in together (each at ``hook_names``
            or its metadata hook, reading the activation as it arrives there, after the
            reconstructions of the SAEs before it), returning a ``JointEvalResult``.
        model: the language model: a ``HookedTransformer``, or a Hugging Face causal LM
            (SAELens' ``HookedProxyLM`` or a bare ``transformers`` model; hook names are
            module paths such as ``model.layers.14``).
        token_batches: an iterable of integer tensors of shape (batch, pos), pos ≥ 2,
            or one such tensor (one batch). Explained variance uses each batch's own
            mean, so batch size is part of the definition (the reference used its
            training batch size); ``tokens.split(n)`` makes batches of n sequences.
        hook_name: where the SAE sits; default ``sae.cfg.metadata.hook_name``.
        hook_name_out: a transcoder's output hook (the MLP output it replaces; default its
            metadata's): explained variance is of the MLP output, which the ablation zeroes.
        hook_names: several SAEs only: where each sits, by name (default: their metadata;
            two at one hook are refused).
        downstream_hooks: later hooks to compare; default every residual-stream hook
            (``blocks.k.hook_resid_post``, a decoder layer's output) after the latest SAE's
            hook. ``()`` for none.
        alive_window_tokens: count a feature as alive if it fires on one of the first
            this many tokens (None: all tokens). Default 500k, the paper's window.
        max_batches: stop after this many batches (needed for endless iterators).
        logits_chunk_size: tokens whose logits are made at once (memory: three
            [chunk, vocab] float32 tensors).
        activation_scaler: one SAE only: the trainer's ``ActivationScaler`` for a
            ``TrainingSAE`` with ``normalize_activations="expected_average_only_in"`` or
            ``"covariance_whitening"`` (scaling that lives outside the SAE until export).
        positions: the positions the SAEs read and replace (``core.positions.PositionFilter``:
            a ``seqpos_slice`` and excluded token ids, or a ``seqpos_slice`` tuple such as
            ``(1, None)``); the others keep their clean activation. L0, alive features and
            explained variance are over the selected positions, CE and KL over all. Default:
            the positions the SAEs' metadata records they were trained on (every position
            when it records none); several SAEs recording different ones are refused.
        seqpos_slice: instead of ``positions``, in the config's form, e.g. ``(1, None)``.
        exclude_special_tokens: with ``seqpos_slice``, in the config's form: ``True`` (the
            tokenizer's special tokens), ``False`` or a list of token ids. Default: metadata.

    Raises:
        ValueError: for an SAE or token batch it cannot evaluate, naming the field and the fix.
    """
    several = isinstance(sae, Mapping)
    if several and any(x is not None for x in (activation_scaler, hook_name, hook_name_out)):
        raise ValueError(
            "evaluate_sae got several SAEs with activation_scaler or hook_name set; give "
            "each SAE's hook in hook_names={name: hook} and evaluate exported SAEs (their "
            "scaling folded into the weights)."
        )
    if not several and hook_names is not None:
        raise ValueError("hook_names is for several SAEs {name: SAE}; give one SAE's hook_name.")
    saes: dict[str, SAE[Any]] = dict(sae) if isinstance(sae, Mapping) else {_ONE: sae}
    if not saes:
        raise ValueError("saes is empty; pass {name: SAE} with at least one SAE.")
    for name, one in saes.items():
        if not isinstance(one, SAE):
            raise ValueError(
                f"{f'saes[{name!r}]' if several else 'sae'} is a {type(one).__name__}, not a "
                "SAELens SAE; load it first, e.g. SAE.load_from_disk(folder)."
            )
    if not is_spliceable(model):
        raise ValueError(
            f"model is a {type(model).__name__}; evaluate_sae runs a HookedTransformer or a "
            "Hugging Face causal LM (SAELens' HookedProxyLM). Load it with SAELens' load_model."
        )
    positions = eval_positions(sae, model, positions, seqpos_slice, exclude_special_tokens)
    given = dict(hook_names or {}) if several else {_ONE: hook_name}
    hooks = {name: resolve_hook_name(one, given.get(name)) for name, one in saes.items()}
    outputs = {}  # each transcoder's output hook and width
    for name, one in saes.items():
        hook_out = resolve_hook_name_out(one, None if several else hook_name_out)
        check_sae(one, activation_scaler, logits_chunk_size, alive_window_tokens)
        if hook_out is not None:
            outputs[name] = (hook_out, getattr(one.cfg, "d_out", None))
    d_ins = {name: one.cfg.d_in for name, one in saes.items()}
    if several:  # errors name the SAE and its fields as a run of several does
        plan = plan_multi_splice(model, hooks, d_ins, "joint", downstream_hooks, outputs)
    else:
        out, d_out = outputs.get(_ONE, (None, None))
        one_plan = plan_splice(
            model, hooks[_ONE], downstream_hooks, d_in=d_ins[_ONE], hook_name_out=out, d_out=d_out
        )
        plan = MultiSplicePlan.of_one(_ONE, one_plan)
    totals = _Totals({n: _SAETotals(s.cfg.d_sae, alive_window_tokens) for n, s in saes.items()})
    with eval_mode(model, *saes.values()):
        for tokens in token_batches_checked(token_batches, max_batches):
            tokens = tokens.to(model_facts(model).device)
            _evaluate_batch(
                saes, model, plan, tokens, totals, activation_scaler, logits_chunk_size, positions
            )
    return totals.joint(plan) if several else totals.one(plan.plans[_ONE])


def evaluate_saes_jointly(
    saes: Mapping[str, SAE[Any]],
    model: Any,
    token_batches: Iterable[torch.Tensor] | torch.Tensor,
    **options: Any,
) -> JointEvalResult:
    """``evaluate_sae`` of several SAEs ``{name: SAE}`` spliced in together, by its own name."""
    return evaluate_sae(dict(saes), model, token_batches, **options)


@dataclass
class _SAETotals:
    """One SAE's running sums: its sparsity and reconstruction at its hook."""

    d_sae: int
    alive_window: int | None
    n_spliced: int = 0
    active: float = 0.0
    explained_variance: float = 0.0
    explained_variance_reference: float = 0.0
    alive_tokens: int = 0
    fired: torch.Tensor | None = None

    def add(self, feature_acts: torch.Tensor, sae_out: torch.Tensor, target: torch.Tensor) -> None:
        """One batch's [batch, pos, d_sae] features and reconstruction of ``target``."""
        self.n_spliced += feature_acts.shape[0] * feature_acts.shape[1]
        self.active += float(active_features_per_token(feature_acts).sum())
        flat = rearrange(feature_acts, "batch pos d_sae -> (batch pos) d_sae")
        room = flat.shape[0] if self.alive_window is None else self.alive_window - self.alive_tokens
        window = flat[: max(room, 0)]
        fired = (window != 0).any(0).cpu()
        self.fired = fired if self.fired is None else self.fired | fired
        self.alive_tokens += window.shape[0]
        self.explained_variance += float(explained_variance_per_token(sae_out, target).sum())
        # The reference's argument order: the reconstruction is the "target" whose spread divides.
        reference = explained_variance_per_token(target, sae_out)
        self.explained_variance_reference += float(reference.sum())

    @property
    def alive(self) -> int:
        return int(self.fired.sum()) if self.fired is not None else 0


@dataclass
class _Totals:
    """Running sums over batches of the model's output (every SAE in); ``one`` and ``joint``
    divide them into averages."""

    saes: dict[str, _SAETotals]
    n_tokens: int = 0
    n_sequences: int = 0
    n_predicted: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_ablated: float = 0.0
    kl_spliced: float = 0.0
    kl_ablated: float = 0.0
    downstream_sq_error: dict[str, float] = field(default_factory=dict)
    downstream_elements: dict[str, int] = field(default_factory=dict)
    downstream_ev: dict[str, float] = field(default_factory=dict)

    def add_downstream(self, name: str, patched: torch.Tensor, clean: torch.Tensor) -> None:
        """One batch's patched-vs-clean comparison at a downstream hook."""
        patched, clean = flatten_heads(patched), flatten_heads(clean)
        sq_error = (patched.float() - clean.float()).pow(2).sum()
        self.downstream_sq_error[name] = self.downstream_sq_error.get(name, 0.0) + float(sq_error)
        self.downstream_elements[name] = self.downstream_elements.get(name, 0) + clean.numel()
        ev = float(explained_variance_per_token(patched, clean).sum())
        self.downstream_ev[name] = self.downstream_ev.get(name, 0.0) + ev

    def add_outputs(
        self,
        head: Callable[[torch.Tensor], torch.Tensor],
        tokens: torch.Tensor,
        resids: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        chunk_size: int,
    ) -> None:
        """CE and KL sums of one batch's clean, spliced and ablated final residuals, a chunk of
        tokens' logits at a time."""
        batch, pos = tokens.shape
        self.n_tokens += batch * pos
        self.n_sequences += batch
        self.n_predicted += batch * (pos - 1)
        targets = rearrange(next_token_targets(tokens), "batch pos -> (batch pos)")
        flat = (rearrange(r, "batch pos d_model -> (batch pos) d_model") for r in resids)
        for target, *rows in chunk_rows(chunk_size, targets.to(resids[0].device), *flat):
            # [chunk, vocab] float32 logits of the three runs; dropped at the end of the chunk.
            clean, spliced, ablated = (head(r).float() for r in rows)
            self.ce_clean += ce_sum(clean, target)
            self.ce_spliced += ce_sum(spliced, target)
            self.ce_ablated += ce_sum(ablated, target)
            self.kl_spliced += float(kl_orig_to_patched_sum(clean, spliced))
            self.kl_ablated += float(kl_orig_to_patched_sum(clean, ablated))

    def outputs(self) -> dict[str, Any]:
        """The averages of the output's metrics: the fields both results share."""
        if self.n_tokens == 0:
            raise ValueError(
                "token_batches yielded no batch: pass (batch, pos) token tensors of held-out data."
            )
        ce_clean, ce_spliced, ce_ablated = (
            total / self.n_predicted for total in (self.ce_clean, self.ce_spliced, self.ce_ablated)
        )
        kl_spliced, kl_ablated = self.kl_spliced / self.n_tokens, self.kl_ablated / self.n_tokens
        return dict(
            n_tokens=self.n_tokens,
            n_sequences=self.n_sequences,
            ce_loss_clean=ce_clean,
            ce_loss_spliced=ce_spliced,
            ce_loss_increase=ce_spliced - ce_clean,
            ce_loss_zero_ablation=ce_ablated,
            ce_loss_score=ratio(ce_ablated - ce_spliced, ce_ablated - ce_clean),
            kl_orig_patched=kl_spliced,
            kl_orig_ablated=kl_ablated,
            kl_score=1.0 - ratio(kl_spliced, kl_ablated),
            downstream={
                name: DownstreamMetrics(
                    mse=self.downstream_sq_error[name] / self.downstream_elements[name],
                    explained_variance=self.downstream_ev[name] / self.n_tokens,
                )
                for name in self.downstream_ev
            },
        )

    def one(self, plan: SplicePlan) -> EvalResult:
        outputs, sae = self.outputs(), self.saes[_ONE]
        return EvalResult(
            hook_name=plan.hook_name,
            hook_name_out=plan.hook_name_out,
            n_spliced=sae.n_spliced,
            l0=sae.active / sae.n_spliced,
            d_sae=sae.d_sae,
            alive_features=sae.alive,
            alive_fraction=sae.alive / sae.d_sae,
            alive_tokens=sae.alive_tokens,
            explained_variance=sae.explained_variance / sae.n_spliced,
            explained_variance_reference=sae.explained_variance_reference / sae.n_spliced,
            **outputs,
        )

    def joint(self, plan: MultiSplicePlan) -> JointEvalResult:
        outputs, saes = self.outputs(), [self.saes[name] for name in plan.names]
        return JointEvalResult(
            hook_names={name: plan.plans[name].hook_name for name in plan.names},
            n_spliced=saes[0].n_spliced,  # every SAE replaces the same positions
            l0={name: s.active / s.n_spliced for name, s in zip(plan.names, saes, strict=True)},
            alive_features={name: s.alive for name, s in zip(plan.names, saes, strict=True)},
            explained_variance={
                name: s.explained_variance / s.n_spliced
                for name, s in zip(plan.names, saes, strict=True)
            },
            **outputs,
        )


def _evaluate_batch(
    saes: dict[str, SAE[Any]],
    model: Any,
    plan: MultiSplicePlan,
    tokens: torch.Tensor,
    totals: _Totals,
    scaler: ActivationScaler | None,
    chunk_size: int,
    positions: PositionFilter,
) -> None:
    """Clean, spliced and zero-ablated runs of one batch from a shared prefix; add to totals."""
    prefix = run_prefix(model, tokens, plan)
    clean = run_clean_multi(model, prefix, plan, inputs=False)
    mask = None if positions.selects_all else selected_positions(tokens, positions)
    splices = {
        n: partial(_spliced, sae, model, scaler, mask, totals.saes[n]) for n, sae in saes.items()
    }
    spliced = run_joint_patched(model, prefix, plan, splices)
    no_downstream = dataclasses.replace(plan, downstream_hooks=())
    zeroed = dict.fromkeys(saes, partial(_zeroed, mask))
    ablated = run_joint_patched(model, prefix, no_downstream, zeroed)
    assert clean.final_resid is not None  # a full run reaches the last block
    for name in plan.downstream_hooks:
        totals.add_downstream(name, spliced.downstream[name], clean.downstream[name])
    resids = (clean.final_resid, spliced.final_resid, ablated.final_resid)
    totals.add_outputs(model_head(model, plan), tokens, resids, chunk_size)


def _spliced(
    sae: SAE[Any],
    model: Any,
    scaler: ActivationScaler | None,
    mask: torch.Tensor | None,
    totals: _SAETotals,
    acts: torch.Tensor,
    replaced: torch.Tensor,
) -> torch.Tensor:
    """The SAE's reconstruction of the activation arriving at its hook, at the selected
    positions (the others keep theirs); its sums recorded. What it replaces, ``replaced``, is
    its own input, or a transcoder's target (the MLP output)."""
    sae_in = acts if mask is None else acts[mask][None]
    target = replaced if mask is None else replaced[mask][None]
    feature_acts, sae_out = encode_decode(sae, model, sae_in, scaler)
    totals.add(feature_acts, sae_out, target)
    return sae_out if mask is None else with_reconstruction(replaced, mask, sae_out[0])


def _zeroed(mask: torch.Tensor | None, acts: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
    """The zero ablation: what the SAE replaces, zeroed at the selected positions only."""
    zeros = torch.zeros_like(replaced)
    return zeros if mask is None else torch.where(mask[..., None], zeros, replaced)
