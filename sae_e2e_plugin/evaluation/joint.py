"""Several SAEs spliced into their model together, measured on held-out tokens.

``evaluate_saes_jointly`` runs each token batch clean and with every SAE spliced in at once
(``core.multi_splice.run_joint_patched``, the splice a joint run trains with): each SAE reads the
activation arriving at its hook, after the reconstructions of the SAEs before it. It reports
what the suite does to the model's output (CE increase, KL) and each SAE's L0 and explained
variance on the inputs it sees there. Each SAE alone is ``evaluate_sae``'s business.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from sae_lens import SAE

from sae_e2e_plugin.core.losses import chunk_rows, kl_orig_to_patched_sum
from sae_e2e_plugin.core.model_splice import (
    model_facts,
    model_head,
    plan_multi_splice,
    run_clean_multi,
    run_joint_patched,
    run_prefix,
)
from sae_e2e_plugin.core.positions import (
    ALL_POSITIONS,
    PositionFilter,
    selected_positions,
    with_reconstruction,
)
from sae_e2e_plugin.evaluation import parts
from sae_e2e_plugin.evaluation.metrics import (
    active_features_per_token,
    explained_variance_per_token,
    next_token_targets,
)
from sae_e2e_plugin.run_files import atomic_write_text


@dataclass(frozen=True)
class JointEvalResult:
    """Every SAE spliced in at once, averaged over every evaluated token."""

    hook_names: dict[str, str]
    """Each SAE's hook, by SAE name."""
    n_tokens: int
    """Tokens evaluated."""
    n_sequences: int
    """Sequences evaluated; CE averages over n_tokens − n_sequences predictions."""
    n_spliced: int
    """Tokens at which each SAE replaced its activation (all, or the selected positions)."""
    ce_loss_clean: float
    """Next-token cross-entropy of the unmodified model (nats)."""
    ce_loss_spliced: float
    """Next-token cross-entropy with every SAE spliced in."""
    ce_loss_increase: float
    """ce_loss_spliced − ce_loss_clean."""
    kl_orig_patched: float
    """KL(p_orig ‖ p_spliced) summed over the vocabulary, averaged over tokens."""
    l0: dict[str, float] = field(default_factory=dict)
    """Each SAE's mean active features per spliced token, on the activations it sees in the
    joint run."""
    explained_variance: dict[str, float] = field(default_factory=dict)
    """Each SAE's per-token explained variance of those activations, averaged."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` atomically; return it."""
        return atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def format_table(self) -> str:
        """A plain-text table: the suite's output metrics, then one row per SAE."""
        lines = [
            f"all {len(self.hook_names)} SAEs spliced together ({self.n_tokens} tokens):",
            f"  CE clean {self.ce_loss_clean:.4f}  spliced {self.ce_loss_spliced:.4f}  "
            f"increase {self.ce_loss_increase:.4f}  KL {self.kl_orig_patched:.4f}",
        ]
        for name, hook in self.hook_names.items():
            lines.append(
                f"  {name:<12} {hook:<28} L0 {self.l0[name]:8.2f}  "
                f"explained variance {self.explained_variance[name]:.4f}"
            )
        return "\n".join(lines)


@dataclass
class _Totals:
    n_tokens: int = 0
    n_sequences: int = 0
    n_predicted: int = 0
    n_spliced: int = 0
    ce_clean: float = 0.0
    ce_spliced: float = 0.0
    kl: float = 0.0
    active: dict[str, float] = field(default_factory=dict)
    explained_variance: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_saes_jointly(
    saes: Mapping[str, SAE[Any]],
    model: Any,
    token_batches: Iterable[torch.Tensor] | torch.Tensor,
    *,
    hook_names: Mapping[str, str] | None = None,
    max_batches: int | None = None,
    logits_chunk_size: int = 1024,
    positions: PositionFilter = ALL_POSITIONS,
) -> JointEvalResult:
    """Evaluate ``saes`` (by name) spliced into ``model`` together on ``(batch, pos)`` batches.

    ``hook_names`` default to each SAE's ``cfg.metadata.hook_name``; two SAEs at one hook are
    refused. SAEs with their normalisation outside the weights (a training SAE's activation
    scaler) are refused: evaluate the exported SAEs. Raises ValueError naming the SAE and the fix.
    """
    if not saes:
        raise ValueError("saes is empty; pass {name: SAE} with at least one SAE.")
    hooks = {
        name: parts.resolve_hook_name(sae, (hook_names or {}).get(name))
        for name, sae in saes.items()
    }
    outputs = {}  # each transcoder's output hook and width (default: its metadata)
    for name, sae in saes.items():
        parts.check_sae(sae, None, logits_chunk_size, None, transcoders=True)
        hook_out = parts.resolve_hook_name_out(sae, None)
        if hook_out is not None:
            outputs[name] = (hook_out, sae.cfg.d_out)
    d_ins = {name: sae.cfg.d_in for name, sae in saes.items()}
    plan = plan_multi_splice(model, hooks, d_ins, "joint", (), outputs)
    totals = _Totals(active=dict.fromkeys(saes, 0.0), explained_variance=dict.fromkeys(saes, 0.0))
    with parts.eval_mode(model, *saes.values()):
        for tokens in parts.token_batches_checked(token_batches, max_batches):
            tokens = tokens.to(model_facts(model).device)
            prefix = run_prefix(model, tokens, plan)
            clean = run_clean_multi(model, prefix, plan, inputs=False)
            mask = None if positions.selects_all else selected_positions(tokens, positions)
            splices = {
                name: partial(_splice, sae, model, mask, totals, name) for name, sae in saes.items()
            }
            patched = run_joint_patched(model, prefix, plan, splices)
            assert clean.final_resid is not None
            _add_output_metrics(
                model_head(model, plan),
                tokens,
                clean.final_resid,
                patched.final_resid,
                totals,
                logits_chunk_size,
            )
            totals.n_spliced += tokens.numel() if mask is None else int(mask.sum())
    if totals.n_tokens == 0:
        raise ValueError("token_batches yielded no batch: pass (batch, pos) token tensors.")
    n_spliced = totals.n_spliced
    ce_clean = totals.ce_clean / totals.n_predicted
    ce_spliced = totals.ce_spliced / totals.n_predicted
    return JointEvalResult(
        hook_names={name: plan.plans[name].hook_name for name in plan.names},
        n_tokens=totals.n_tokens,
        n_sequences=totals.n_sequences,
        n_spliced=n_spliced,
        ce_loss_clean=ce_clean,
        ce_loss_spliced=ce_spliced,
        ce_loss_increase=ce_spliced - ce_clean,
        kl_orig_patched=totals.kl / totals.n_tokens,
        l0={name: totals.active[name] / n_spliced for name in plan.names},
        explained_variance={
            name: totals.explained_variance[name] / n_spliced for name in plan.names
        },
    )


def _splice(
    sae: SAE[Any],
    model: Any,
    mask: torch.Tensor | None,
    totals: _Totals,
    name: str,
    acts: torch.Tensor,
    replaced: torch.Tensor,
) -> torch.Tensor:
    """The SAE's reconstruction of the activation arriving at its hook (a transcoder's output,
    measured against the MLP output ``replaced``); its sums recorded."""
    sae_in = acts if mask is None else acts[mask][None]
    target = replaced if mask is None else replaced[mask][None]
    feature_acts, sae_out = parts.encode_decode(sae, model, sae_in, None)
    totals.active[name] += float(active_features_per_token(feature_acts).sum())
    totals.explained_variance[name] += float(explained_variance_per_token(sae_out, target).sum())
    if mask is None:
        return sae_out
    return with_reconstruction(replaced, mask, sae_out[0])


def _add_output_metrics(
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    clean: torch.Tensor,
    spliced: torch.Tensor,
    totals: _Totals,
    chunk_size: int,
) -> None:
    batch, pos = tokens.shape
    totals.n_tokens += batch * pos
    totals.n_sequences += batch
    totals.n_predicted += batch * (pos - 1)
    targets = rearrange(next_token_targets(tokens), "batch pos -> (batch pos)")
    flat = (rearrange(r, "batch pos d_model -> (batch pos) d_model") for r in (clean, spliced))
    for target, resid_clean, resid_spliced in chunk_rows(chunk_size, targets, *flat):
        logits_clean, logits_spliced = head(resid_clean).float(), head(resid_spliced).float()
        totals.ce_clean += parts.ce_sum(logits_clean, target)
        totals.ce_spliced += parts.ce_sum(logits_spliced, target)
        totals.kl += float(kl_orig_to_patched_sum(logits_clean, logits_spliced))
