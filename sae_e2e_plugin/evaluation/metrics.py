"""The paper's evaluation metrics: the result record and the per-token formulas.

Definitions follow Braun et al. 2024 (arXiv 2405.12241) and the reference
implementation's ``calc_explained_variance`` / ``calc_output_metrics`` /
``ActFrequencyMetrics``; the CE- and KL-recovered scores follow SAELens'
``evals.get_downstream_reconstruction_metrics``. ``docs/evaluation.md`` gives
every formula. ``evaluate`` measures an SAE and fills an ``EvalResult``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped

from sae_e2e_plugin.run_files import atomic_write_text

DEFAULT_ALIVE_WINDOW_TOKENS = 500_000
"""Tokens over which a feature must fire once to count as alive: the paper's window.

The alive count grows with the window (a feature firing once in 10⁶ tokens is
dead over 10⁵), so numbers are comparable with the paper's only over the same
window. On a smaller evaluation set every token is used and ``alive_tokens``
says how many.
"""

IGNORE_TARGET = -100
"""Target id of positions with no next token (``F.cross_entropy``'s ``ignore_index``)."""


@dataclass(frozen=True)
class DownstreamMetrics:
    """How far the patched run's activation at one later hook is from the clean run's."""

    mse: float
    """Squared error averaged over every element (batch, position, width), as the
    reference's ``F.mse_loss(patched, clean)``."""
    explained_variance: float
    """Per token 1 − ‖patched − clean‖² / ‖clean − mean(clean)‖², averaged over tokens;
    mean(clean) is the mean over the tokens of the token's own evaluation batch."""


@dataclass(frozen=True)
class EvalResult:
    """The paper's metrics for one SAE, averaged over every evaluated token."""

    hook_name: str
    """The hook the SAE reads and whose activation its reconstruction replaces."""
    n_tokens: int
    """Tokens evaluated (batch × pos summed over batches)."""
    n_sequences: int
    """Sequences evaluated; the CE losses average over n_tokens − n_sequences predictions."""
    n_spliced: int
    """Tokens at which the SAE's reconstruction replaced the activation: all of them, or those
    ``seqpos_slice`` / excluded token ids select. L0, the alive count and the explained variance
    at the hook are over these; CE and KL over all ``n_tokens``."""
    ce_loss_clean: float
    """Next-token cross-entropy of the unmodified model (nats, float32)."""
    ce_loss_spliced: float
    """Next-token cross-entropy with the SAE's reconstruction spliced in at the hook."""
    ce_loss_increase: float
    """ce_loss_spliced − ce_loss_clean: the paper's headline "CE loss increase"."""
    ce_loss_zero_ablation: float
    """Next-token cross-entropy with the hook's activation replaced by zeros."""
    ce_loss_score: float
    """(ce_loss_zero_ablation − ce_loss_spliced) / (ce_loss_zero_ablation − ce_loss_clean):
    the fraction of the ablation's damage the SAE recovers (SAELens' ``ce_loss_score``)."""
    kl_orig_patched: float
    """KL(p_orig ‖ p_spliced) summed over the vocabulary, averaged over all tokens."""
    kl_orig_ablated: float
    """KL(p_orig ‖ p_ablated) summed over the vocabulary, averaged over all tokens."""
    kl_score: float
    """1 − kl_orig_patched / kl_orig_ablated (SAELens' ``kl_div_score``)."""
    l0: float
    """Mean number of non-zero feature activations per token."""
    d_sae: int
    """Number of features in the dictionary."""
    alive_features: int
    """Features that are non-zero on at least one of the first ``alive_tokens`` tokens."""
    alive_fraction: float
    """alive_features / d_sae."""
    alive_tokens: int
    """Tokens the alive count used: min(alive_window_tokens, n_tokens)."""
    explained_variance: float
    """At the SAE's hook, per token 1 − ‖â − a‖² / ‖a − mean(a)‖², averaged over tokens;
    mean(a) is the mean over the tokens of the token's own evaluation batch."""
    explained_variance_reference: float
    """The reference's logged SAE-position value (``out_to_in/explained_variance``): the same
    with the reconstruction's spread as denominator, 1 − ‖a − â‖² / ‖â − mean(â)‖², because
    its code passes the SAE output as the target. Use it to compare with the paper's runs."""
    downstream: dict[str, DownstreamMetrics] = field(hash=False)
    """Patched-vs-clean comparison at each later hook, by hook name, in firing order."""
    hook_name_out: str | None = field(default=None, kw_only=True)
    """A transcoder's output hook (the MLP output): its output replaced the activation there,
    explained variance is of that activation, and the zero ablation zeroed it. None: an SAE."""

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-safe dict: scalar fields by name, ``downstream/<hook>/<metric>``;
        NaN and infinities become None."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["downstream"]
        if self.hook_name_out is None:  # an SAE's record has the fields it always had
            del out["hook_name_out"]
        return _json_numbers(out) | _downstream_dict(self.downstream)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        """Inverse of ``to_dict`` (None reads back as NaN)."""
        scalars: dict[str, Any] = {}
        downstream: dict[str, dict[str, float]] = {}
        for key, value in data.items():
            if key.startswith("downstream/"):
                hook, metric = key[len("downstream/") :].rsplit("/", 1)
                downstream.setdefault(hook, {})[metric] = _from_json_number(value)
            else:
                scalars[key] = value
        scalars.setdefault("n_spliced", scalars.get("n_tokens"))  # files from before positions
        for f in dataclasses.fields(cls):
            if f.type == "float" and f.name in scalars:
                scalars[f.name] = _from_json_number(scalars[f.name])
        return cls(
            **scalars,
            downstream={hook: DownstreamMetrics(**m) for hook, m in downstream.items()},
        )

    def format_table(self) -> str:
        """A plain-text table of every metric."""
        rows = [
            ("CE loss, clean", self.ce_loss_clean),
            ("CE loss, SAE spliced in", self.ce_loss_spliced),
            ("CE loss increase", self.ce_loss_increase),
            (f"CE loss, zero ablation{self._ablated}", self.ce_loss_zero_ablation),
            ("CE loss score", self.ce_loss_score),
            ("KL(orig || spliced)", self.kl_orig_patched),
            (f"KL(orig || ablated){self._ablated}", self.kl_orig_ablated),
            ("KL score", self.kl_score),
            ("L0", self.l0),
            (f"alive features (first {self.alive_tokens:,} tokens)", self.alive_features),
            ("alive fraction", self.alive_fraction),
            (
                "explained variance" + (" of the MLP output" if self._ablated else ""),
                self.explained_variance,
            ),
        ]
        # explained_variance_reference (the reference's SAE-position formula, whose denominator
        # is the reconstruction's spread) stays in to_dict()/JSON: on e2e SAEs it is often
        # hugely negative and would mislead in a table read at a glance.
        width = max(len(name) for name, _ in rows)
        where = f"SAE at {self.hook_name}"
        if self.hook_name_out is not None:
            where = f"transcoder {self.hook_name} -> {self.hook_name_out}"
        lines = [
            f"{where}: {self.n_tokens:,} tokens, {self.n_sequences:,} "
            f"sequences, d_sae={self.d_sae:,}",
            *(
                [
                    f"its output replaces the MLP output at {self.hook_name_out}; zero "
                    "ablation = that MLP output zeroed"
                ]
                if self.hook_name_out is not None
                else []
            ),
            *(
                [
                    f"spliced at {self.n_spliced:,} of the tokens (seqpos_slice / excluded ids): "
                    "L0, alive and explained variance over those, CE and KL over all tokens"
                ]
                if self.n_spliced != self.n_tokens
                else []
            ),
            f"{'metric':<{width}}  value",
            f"{'-' * width}  ----------",
        ]
        lines += [f"{name:<{width}}  {_format_number(value)}" for name, value in rows]
        if self.downstream:
            hook_width = max(len("downstream hook"), *(len(h) for h in self.downstream))
            lines += [
                "",
                f"{'downstream hook':<{hook_width}}  {'MSE':<10}  explained variance",
                f"{'-' * hook_width}  ----------  ------------------",
            ]
            lines += [
                f"{hook:<{hook_width}}  {_format_number(m.mse):<10}  "
                f"{_format_number(m.explained_variance)}"
                for hook, m in self.downstream.items()
            ]
        return "\n".join(lines)

    @property
    def _ablated(self) -> str:
        # A transcoder's zero ablation removes the MLP's output, not its input: the table says so.
        return "" if self.hook_name_out is None else " (MLP output zeroed)"

    def save_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` atomically (parent folders created); return it."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(Path(path), text)


@dataclass(frozen=True)
class JointEvalResult:
    """Several SAEs spliced in together (the joint run a ``splice="joint"`` run trains with),
    averaged over every evaluated token: what the suite does to the model's output, and each
    SAE's sparsity and reconstruction on the activations it sees there. The output's fields
    mean what ``EvalResult``'s do, with every SAE spliced in (or every SAE's activation zeroed);
    the others hold one number per SAE, by name."""

    hook_names: dict[str, str]
    """Each SAE's hook, by SAE name, in firing order."""
    n_tokens: int
    n_sequences: int
    n_spliced: int
    """Tokens at which each SAE replaced its activation (all, or the selected positions)."""
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_increase: float
    ce_loss_zero_ablation: float
    ce_loss_score: float
    kl_orig_patched: float
    kl_orig_ablated: float
    kl_score: float
    l0: dict[str, float]
    alive_features: dict[str, int]
    explained_variance: dict[str, float]
    """Per token, of the activation the SAE sees in the joint run (``EvalResult``'s formula)."""
    downstream: dict[str, DownstreamMetrics] = field(hash=False)
    """Patched-vs-clean comparison at each hook after the latest SAE, by hook name."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: fields by name (the per-SAE ones as ``{name: number}``), the downstream
        comparison as ``EvalResult.to_dict`` writes it; NaN and infinities become None."""
        out = dataclasses.asdict(self)
        del out["downstream"]
        return _json_numbers(out) | _downstream_dict(self.downstream)

    def save_json(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` atomically; return it."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(Path(path), text)

    def format_table(self) -> str:
        """A plain-text table: the suite's output metrics, then one row per SAE."""
        lines = [
            f"all {len(self.hook_names)} SAEs spliced together ({self.n_tokens} tokens):",
            f"  CE clean {self.ce_loss_clean:.4f}  spliced {self.ce_loss_spliced:.4f}  "
            f"increase {self.ce_loss_increase:.4f}  KL {self.kl_orig_patched:.4f}",
            f"  all zeroed: CE {self.ce_loss_zero_ablation:.4f}  CE score "
            f"{self.ce_loss_score:.4f}  KL score {self.kl_score:.4f}",
        ]
        for name, hook in self.hook_names.items():
            lines.append(
                f"  {name:<12} {hook:<28} L0 {self.l0[name]:8.2f}  alive "
                f"{self.alive_features[name]:>6}  explained variance "
                f"{self.explained_variance[name]:.4f}"
            )
        return "\n".join(lines)


@jaxtyped(typechecker=beartype)
def explained_variance_per_token(
    reconstruction: Float[torch.Tensor, "batch pos d_in"],
    target: Float[torch.Tensor, "batch pos d_in"],
) -> Float[torch.Tensor, "batch pos"]:
    """Per token 1 − ‖reconstruction − target‖² / ‖target − mean(target)‖², in float32.

    mean(target) is taken over every token of this batch (batch and pos), as the
    reference's ``calc_explained_variance`` does for its evaluation batch.
    """
    target = target.float()
    residual = (reconstruction.float() - target).pow(2).sum(-1)
    spread = (target - target.mean(dim=(0, 1))).pow(2).sum(-1)
    return 1.0 - residual / spread


@jaxtyped(typechecker=beartype)
def next_token_targets(tokens: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "batch pos"]:
    """The token each position predicts; the last position of a sequence predicts nothing (-100)."""
    targets = torch.full_like(tokens, IGNORE_TARGET)
    targets[:, :-1] = tokens[:, 1:]
    return targets


@jaxtyped(typechecker=beartype)
def active_features_per_token(
    feature_acts: Float[torch.Tensor, "batch pos d_sae"],
) -> Float[torch.Tensor, "batch pos"]:
    """Number of non-zero features at each token (the per-token L0)."""
    return (feature_acts != 0).sum(-1).float()


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else math.nan


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_numbers(fields: dict[str, Any]) -> dict[str, Any]:
    """Each number JSON-safe, one level into dicts of numbers (a joint result's per-SAE ones)."""
    return {
        key: {k: _json_number(v) for k, v in value.items()}
        if isinstance(value, dict)
        else _json_number(value)
        for key, value in fields.items()
    }


def _downstream_dict(downstream: dict[str, DownstreamMetrics]) -> dict[str, Any]:
    return {
        f"downstream/{hook}/{metric}": _json_number(getattr(metrics, metric))
        for hook, metrics in downstream.items()
        for metric in ("mse", "explained_variance")
    }


def _from_json_number(value: Any) -> float:
    return math.nan if value is None else float(value)


def _format_number(value: float | int) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and math.isfinite(value) and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}"
