"""Measuring an SAE spliced into its model on held-out tokens, independent of wandb.

``evaluate_sae`` runs the frozen model three ways on each token batch: clean,
with the SAE's reconstruction spliced in at its hook, and with that hook's
activation replaced by zeros. The three runs share the prefix before the SAE's
block (``core.splice.run_prefix``), and the logits are made a chunk of tokens at a
time (``core.losses.chunk_rows``), so no [tokens, vocab] tensor outlives its chunk.
Each batch adds sums to running totals; ``EvalResult`` (``metrics``) holds the
averages over every token seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
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
    plan_splice,
    run_clean,
    run_patched,
    run_prefix,
)
from sae_e2e_plugin.core.positions import (
    PositionFilter,
    selected_positions,
    with_reconstruction,
)
from sae_e2e_plugin.core.splice import SplicePlan, flatten_heads
from sae_e2e_plugin.evaluation.eval_positions import eval_positions
from sae_e2e_plugin.evaluation.joint import JointEvalResult, evaluate_saes_jointly
from sae_e2e_plugin.evaluation.metrics import (
    DEFAULT_ALIVE_WINDOW_TOKENS,
    DownstreamMetrics,
    EvalResult,
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
    positions: PositionFilter | Sequence[int | None] | None = ...,
    max_batches: int | None = ...,
    seqpos_slice: Sequence[int | None] | None = ...,
    logits_chunk_size: int = ...,
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
            Several SAEs ``{name: SAE}``: all spliced in together
            (``evaluation.joint.evaluate_saes_jointly``, at ``hook_names`` or each SAE's
            metadata hook), returning a ``JointEvalResult``; ``downstream_hooks``,
            ``alive_window_tokens`` and ``activation_scaler`` do not apply there.
        model: the language model: a ``HookedTransformer``, or a Hugging Face causal LM
            (SAELens' ``HookedProxyLM`` or a bare ``transformers`` model; hook names are
            module paths such as ``model.layers.14``).
        token_batches: an iterable of integer tensors of shape (batch, pos), pos ≥ 2,
            or one such tensor (one batch). Explained variance uses each batch's own
            mean, so batch size is part of the definition (the reference used its
            training batch size); ``tokens.split(n)`` makes batches of n sequences.
        hook_name: where the SAE sits; default ``sae.cfg.metadata.hook_name``.
        hook_name_out: a transcoder's output hook (the MLP output it replaces); default
            ``sae.cfg.metadata.hook_name_out``. A transcoder reads ``hook_name``; explained
            variance is of the MLP output (its output against the clean activation at
            ``hook_name_out``) and the zero ablation zeroes the MLP output.
        hook_names: several SAEs only: where each sits, by name (default: their metadata).
        downstream_hooks: later hooks to compare; default every ``blocks.k.hook_resid_post``
            after the SAE's hook. ``()`` for none.
        alive_window_tokens: count a feature as alive if it fires on one of the first
            this many tokens (None: all tokens). Default 500k, the paper's window.
        max_batches: stop after this many batches (needed for endless iterators).
        logits_chunk_size: tokens whose logits are made at once (memory: three
            [chunk, vocab] float32 tensors).
        activation_scaler: the trainer's ``ActivationScaler`` for a ``TrainingSAE`` with
            ``normalize_activations="expected_average_only_in"`` or
            ``"covariance_whitening"`` (scaling that lives outside the SAE until export).
        positions: the positions the SAE reads and replaces (``core.positions.PositionFilter``:
            a ``seqpos_slice`` and excluded token ids, or a ``seqpos_slice`` tuple such as
            ``(1, None)``); the others keep their clean activation. L0, alive features and
            explained variance are over the selected positions, CE and KL over all. Default:
            the positions the SAE's metadata records it was trained on (every position when
            it records none; several SAEs: every position).
        seqpos_slice: instead of ``positions``, in the config's form, e.g. ``(1, None)``.
        exclude_special_tokens: with ``seqpos_slice``, in the config's form: ``True`` (the
            tokenizer's special tokens), ``False`` or a list of token ids. Default: metadata.

    Raises:
        ValueError: for an SAE or token batch this function cannot evaluate; the
            message names the field and the fix.
    """
    positions = eval_positions(
        None if isinstance(sae, Mapping) else sae,
        model,
        positions,
        seqpos_slice,
        exclude_special_tokens,
    )
    if isinstance(sae, Mapping):
        if activation_scaler is not None or hook_name is not None or hook_name_out is not None:
            raise ValueError(
                "evaluate_sae got several SAEs with activation_scaler or hook_name set; give "
                "each SAE's hook in hook_names={name: hook} and evaluate exported SAEs (their "
                "scaling folded into the weights)."
            )
        return evaluate_saes_jointly(
            sae,
            model,
            token_batches,
            hook_names=hook_names,
            max_batches=max_batches,
            logits_chunk_size=logits_chunk_size,
            positions=positions,
        )
    if not is_spliceable(model):
        raise ValueError(
            f"model is a {type(model).__name__}; evaluate_sae runs a HookedTransformer or a "
            "Hugging Face causal LM (SAELens' HookedProxyLM). Load it with SAELens' load_model."
        )
    hook_name = resolve_hook_name(sae, hook_name)
    hook_name_out = resolve_hook_name_out(sae, hook_name_out)
    check_sae(sae, activation_scaler, logits_chunk_size, alive_window_tokens, transcoders=True)
    d_out = getattr(sae.cfg, "d_out", None)
    plan = plan_splice(
        model,
        hook_name,
        downstream_hooks,
        d_in=sae.cfg.d_in,
        hook_name_out=hook_name_out,
        d_out=d_out,
    )
    totals = _Totals(sae.cfg.d_sae, plan.downstream_hooks, alive_window_tokens)
    with eval_mode(sae, model):
        for tokens in token_batches_checked(token_batches, max_batches):
            _evaluate_batch(
                sae,
                model,
                plan,
                tokens.to(model_facts(model).device),
                totals,
                activation_scaler,
                logits_chunk_size,
                positions,
            )
    return totals.result(hook_name, hook_name_out)


@dataclass
class _Totals:
    """Running sums over batches; ``result`` divides them into averages."""

    d_sae: int
    downstream_hooks: tuple[str, ...]
    alive_window: int | None
    n_tokens: int = 0
    n_sequences: int = 0
    n_spliced: int = 0
    n_predicted: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    ce_ablated: float = 0.0
    kl_spliced: float = 0.0
    kl_ablated: float = 0.0
    active: float = 0.0
    explained_variance: float = 0.0
    explained_variance_reference: float = 0.0
    alive_tokens: int = 0
    fired: torch.Tensor | None = None
    downstream_sq_error: dict[str, float] = field(default_factory=dict)
    downstream_elements: dict[str, int] = field(default_factory=dict)
    downstream_ev: dict[str, float] = field(default_factory=dict)

    def add_features(self, feature_acts: torch.Tensor) -> None:
        """Sparsity statistics of one batch's [batch, pos, d_sae] feature activations."""
        self.active += float(active_features_per_token(feature_acts).sum())
        flat = rearrange(feature_acts, "batch pos d_sae -> (batch pos) d_sae")
        room = flat.shape[0] if self.alive_window is None else self.alive_window - self.alive_tokens
        window = flat[: max(room, 0)]
        fired = (window != 0).any(0).cpu()
        self.fired = fired if self.fired is None else self.fired | fired
        self.alive_tokens += window.shape[0]

    def add_downstream(self, name: str, patched: torch.Tensor, clean: torch.Tensor) -> None:
        """One batch's patched-vs-clean comparison at a downstream hook."""
        patched, clean = flatten_heads(patched), flatten_heads(clean)
        sq_error = (patched.float() - clean.float()).pow(2).sum()
        self.downstream_sq_error[name] = self.downstream_sq_error.get(name, 0.0) + float(sq_error)
        self.downstream_elements[name] = self.downstream_elements.get(name, 0) + clean.numel()
        ev = float(explained_variance_per_token(patched, clean).sum())
        self.downstream_ev[name] = self.downstream_ev.get(name, 0.0) + ev

    def result(self, hook_name: str, hook_name_out: str | None = None) -> EvalResult:
        if self.n_tokens == 0:
            raise ValueError(
                "token_batches yielded no batch: pass (batch, pos) token tensors of held-out data."
            )
        ce_clean = self.ce_clean / self.n_predicted
        ce_spliced = self.ce_spliced / self.n_predicted
        ce_ablated = self.ce_ablated / self.n_predicted
        kl_spliced = self.kl_spliced / self.n_tokens
        kl_ablated = self.kl_ablated / self.n_tokens
        alive = int(self.fired.sum()) if self.fired is not None else 0
        return EvalResult(
            hook_name=hook_name,
            hook_name_out=hook_name_out,
            n_tokens=self.n_tokens,
            n_sequences=self.n_sequences,
            n_spliced=self.n_spliced,
            ce_loss_clean=ce_clean,
            ce_loss_spliced=ce_spliced,
            ce_loss_increase=ce_spliced - ce_clean,
            ce_loss_zero_ablation=ce_ablated,
            ce_loss_score=ratio(ce_ablated - ce_spliced, ce_ablated - ce_clean),
            kl_orig_patched=kl_spliced,
            kl_orig_ablated=kl_ablated,
            kl_score=1.0 - ratio(kl_spliced, kl_ablated),
            l0=self.active / self.n_spliced,
            d_sae=self.d_sae,
            alive_features=alive,
            alive_fraction=alive / self.d_sae,
            alive_tokens=self.alive_tokens,
            explained_variance=self.explained_variance / self.n_spliced,
            explained_variance_reference=self.explained_variance_reference / self.n_spliced,
            downstream={
                name: DownstreamMetrics(
                    mse=self.downstream_sq_error[name] / self.downstream_elements[name],
                    explained_variance=self.downstream_ev[name] / self.n_tokens,
                )
                for name in self.downstream_hooks
            },
        )


def _evaluate_batch(
    sae: SAE[Any],
    model: Any,
    plan: SplicePlan,
    tokens: torch.Tensor,
    totals: _Totals,
    scaler: ActivationScaler | None,
    chunk_size: int,
    positions: PositionFilter,
) -> None:
    """Clean, spliced and zero-ablated runs of one batch from a shared prefix; add to totals."""
    batch, pos = tokens.shape
    prefix = run_prefix(model, tokens, plan)
    clean = run_clean(model, prefix, plan, full=True)
    # What the splice replaces: an SAE's own input, or a transcoder's target (the MLP output).
    replaced = clean.acts if clean.target is None else clean.target
    if positions.selects_all:
        sae_in, target = clean.acts, replaced
        feature_acts, sae_out = encode_decode(sae, model, sae_in, scaler)
        reconstruction, ablation = sae_out, torch.zeros_like(replaced)
    else:
        # The selected positions as one [1, selected, d_in] batch; the rest keep their clean
        # activation in the spliced run, and in the ablated one: the baseline removes what the
        # SAE replaces, no more.
        mask = selected_positions(tokens, positions)
        sae_in, target = clean.acts[mask][None], replaced[mask][None]
        feature_acts, sae_out = encode_decode(sae, model, sae_in, scaler)
        reconstruction = with_reconstruction(replaced, mask, sae_out[0])
        ablation = with_reconstruction(replaced, mask, torch.zeros_like(sae_out[0]))
    spliced = run_patched(model, prefix, plan, reconstruction)
    ablated_final = _run_ablated(model, prefix, plan, ablation)
    assert clean.final_resid is not None  # full=True always reaches the last block

    totals.n_tokens += batch * pos
    totals.n_sequences += batch
    totals.n_predicted += batch * (pos - 1)
    totals.n_spliced += sae_in.shape[0] * sae_in.shape[1]
    totals.add_features(feature_acts)
    totals.explained_variance += float(explained_variance_per_token(sae_out, target).sum())
    # The reference's argument order: the reconstruction is the "target" whose spread divides.
    totals.explained_variance_reference += float(
        explained_variance_per_token(target, sae_out).sum()
    )
    for name in plan.downstream_hooks:
        totals.add_downstream(name, spliced.downstream[name], clean.downstream[name])
    _add_output_metrics(
        model_head(model, plan),
        tokens,
        clean.final_resid,
        spliced.final_resid,
        ablated_final,
        totals,
        chunk_size,
    )


def _run_ablated(model: Any, prefix: Any, plan: SplicePlan, ablation: torch.Tensor) -> torch.Tensor:
    """Final residual [batch, pos, d_model] with the hook's activation replaced by ``ablation``
    (zeros at the positions the SAE replaces)."""
    no_downstream = dataclasses.replace(plan, downstream_hooks=())
    return run_patched(model, prefix, no_downstream, ablation).final_resid


def _add_output_metrics(
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    clean: torch.Tensor,
    spliced: torch.Tensor,
    ablated: torch.Tensor,
    totals: _Totals,
    chunk_size: int,
) -> None:
    """CE and KL sums over the batch, a chunk of tokens' logits at a time."""
    targets = rearrange(next_token_targets(tokens), "batch pos -> (batch pos)")
    targets = targets.to(clean.device)
    flat = (
        rearrange(r, "batch pos d_model -> (batch pos) d_model") for r in (clean, spliced, ablated)
    )
    for target, *resids in chunk_rows(chunk_size, targets, *flat):
        # [chunk, vocab] float32 logits of the three runs; dropped at the end of the chunk.
        logits_clean, logits_spliced, logits_ablated = (head(r).float() for r in resids)
        totals.ce_clean += ce_sum(logits_clean, target)
        totals.ce_spliced += ce_sum(logits_spliced, target)
        totals.ce_ablated += ce_sum(logits_ablated, target)
        totals.kl_spliced += float(kl_orig_to_patched_sum(logits_clean, logits_spliced))
        totals.kl_ablated += float(kl_orig_to_patched_sum(logits_clean, logits_ablated))
