"""Per-feature statistics kept while the tokens stream past, in memory that does not grow with
the number of tokens: firing counts, sums and maxima, a log-scale activation histogram, a
running top-k of activations, a uniform sample of firing tokens (reservoir sampling by random
keys) and the L0 of every token as a histogram. Tokens are named by their flat index
``sequence * context + position`` in the pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped

HIST_LOG10_RANGE = (-4.0, 4.0)
"""Activation histogram range in log10 units; values outside are counted in the end bins."""
HIST_BINS = 64
"""Histogram bins over ``HIST_LOG10_RANGE`` (an eighth of a decade each)."""


@dataclass
class RunningTopK:
    """The ``k`` largest scores seen per feature and the tokens that gave them."""

    k: int
    d_sae: int
    scores: torch.Tensor = field(init=False)
    """[d_sae, k] best scores so far, descending; ``-inf`` where fewer were seen."""
    tokens: torch.Tensor = field(init=False)
    """[d_sae, k] flat token index of each score (-1 where none)."""
    values: torch.Tensor = field(init=False)
    """[d_sae, k] the activation at each kept token (0 where none)."""

    def __post_init__(self) -> None:
        self.scores = torch.full((self.d_sae, self.k), -torch.inf)
        self.tokens = torch.full((self.d_sae, self.k), -1, dtype=torch.long)
        self.values = torch.zeros(self.d_sae, self.k)

    @jaxtyped(typechecker=beartype)
    def update(
        self,
        scores: Float[torch.Tensor, "tokens d_sae"],
        values: Float[torch.Tensor, "tokens d_sae"],
        first_token: int,
    ) -> None:
        """Merge a batch's scores (rows are tokens ``first_token``, ``first_token + 1``, ...)."""
        k = min(self.k, scores.shape[0])
        best, rows = scores.topk(k, dim=0)  # [k, d_sae] each
        merged = torch.cat([self.scores, best.T.float()], dim=1)
        merged_tokens = torch.cat([self.tokens, rows.T + first_token], dim=1)
        merged_values = torch.cat([self.values, values.gather(0, rows).T.float()], dim=1)
        self.scores, order = merged.topk(self.k, dim=1)
        self.tokens = merged_tokens.gather(1, order)
        self.values = merged_values.gather(1, order)


@dataclass
class FeatureStats:
    """What one pass keeps about every feature of one SAE."""

    d_sae: int
    top_k: int = 20
    """Top-activating tokens kept per feature."""
    n_samples: int = 40
    """Firing tokens sampled uniformly per feature (for the quantile bands)."""
    seed: int = 0
    n_tokens: int = 0
    """Tokens seen."""
    fired: torch.Tensor = field(init=False)
    """[d_sae] tokens on which each feature was > 0."""
    act_sum: torch.Tensor = field(init=False)
    """[d_sae] sum of each feature's activations (float64)."""
    act_max: torch.Tensor = field(init=False)
    """[d_sae] largest activation (0 for a feature that never fired)."""
    histogram: torch.Tensor = field(init=False)
    """[d_sae, HIST_BINS] counts of positive activations by log10 bin."""
    l0_counts: torch.Tensor = field(init=False)
    """[d_sae + 1] tokens with each L0."""
    top: RunningTopK = field(init=False)
    samples: RunningTopK = field(init=False)
    """Scores are minus random keys: the firing tokens with the smallest keys form a uniform
    sample without replacement of every firing token seen."""
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(self.d_sae, dtype=torch.float64)
        self.act_max = torch.zeros(self.d_sae)
        self.histogram = torch.zeros(self.d_sae, HIST_BINS, dtype=torch.long)
        self.l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.long)
        self.top = RunningTopK(self.top_k, self.d_sae)
        self.samples = RunningTopK(self.n_samples, self.d_sae)
        self._generator = torch.Generator().manual_seed(self.seed)

    @jaxtyped(typechecker=beartype)
    def update(self, acts: Float[torch.Tensor, "tokens d_sae"]) -> None:
        """Add the feature activations of the next ``tokens`` tokens of the pass."""
        acts = acts.detach().float().cpu()
        first = self.n_tokens
        firing = acts > 0
        self.fired += firing.sum(0)
        self.act_sum += acts.sum(0, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, acts.max(0).values.clamp(min=0))
        self.l0_counts += torch.bincount(firing.sum(1), minlength=self.d_sae + 1)
        self._add_histogram(acts, firing)
        self.top.update(acts, acts, first)
        self._add_samples(acts, firing, first)
        self.n_tokens += acts.shape[0]

    def _add_histogram(self, acts: torch.Tensor, firing: torch.Tensor) -> None:
        token_idx, feature_idx = firing.nonzero(as_tuple=True)
        bins = log10_bin(acts[token_idx, feature_idx])
        flat = feature_idx * HIST_BINS + bins
        self.histogram += torch.bincount(flat, minlength=self.d_sae * HIST_BINS).view(
            self.d_sae, HIST_BINS
        )

    def _add_samples(self, acts: torch.Tensor, firing: torch.Tensor, first: int) -> None:
        keys = torch.rand(acts.shape, generator=self._generator)
        # Non-firing tokens never enter the sample: their score is -inf.
        scores = torch.where(firing, -keys, torch.tensor(-torch.inf))
        self.samples.update(scores, acts, first)

    def top_examples(self, feature: int) -> list[tuple[int, float]]:
        """The feature's top tokens as (flat token index, activation), firing ones only."""
        return [
            (int(t), float(s))
            for t, s in zip(self.top.tokens[feature], self.top.scores[feature], strict=True)
            if s > 0 and t >= 0
        ]

    def sampled_examples(self, feature: int) -> list[tuple[int, float]]:
        """The feature's sampled firing tokens as (flat token index, activation)."""
        tokens = self.samples.tokens[feature]
        values = self.samples.values[feature]
        scores = self.samples.scores[feature]
        return [
            (int(t), float(a))
            for t, a, s in zip(tokens, values, scores, strict=True)
            if t >= 0 and s > -torch.inf
        ]

    @property
    def frequency(self) -> torch.Tensor:
        """[d_sae] share of tokens on which each feature fired."""
        return self.fired.double() / max(self.n_tokens, 1)

    @property
    def mean_l0(self) -> float:
        counts = self.l0_counts.double()
        return float((counts * torch.arange(len(counts))).sum() / max(self.n_tokens, 1))


@jaxtyped(typechecker=beartype)
def log10_bin(values: Float[torch.Tensor, " n"]) -> Int[torch.Tensor, " n"]:
    """The histogram bin of each positive value (clamped into the first and last bins)."""
    low, high = HIST_LOG10_RANGE
    position = (values.log10() - low) / (high - low) * HIST_BINS
    return position.floor().clamp(0, HIST_BINS - 1).long()


def bin_edges() -> list[float]:
    """The activation value at each histogram bin edge (``HIST_BINS + 1`` of them)."""
    low, high = HIST_LOG10_RANGE
    return [10 ** (low + (high - low) * i / HIST_BINS) for i in range(HIST_BINS + 1)]
