"""Per-feature statistics kept while the tokens stream past, in memory that does not grow with
the number of tokens: firing counts, sums and maxima, a log-scale activation histogram, a
running top-k of activations, a uniform sample of firing tokens (reservoir sampling by random
keys) and the L0 of every token as a histogram. Tokens are named by their flat index
``sequence * context + position`` in the pass.

Everything but the firing mask works on a batch's firing (token, feature) pairs alone, so a
batch costs about its number of firing pairs (L0 × tokens), not tokens × d_sae."""

from __future__ import annotations

import math
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
    """The ``k`` largest scores seen per feature, the tokens that gave them and a value each."""

    k: int
    d_sae: int
    width: int = 1
    """Activations kept around each entry (its window: ``before`` + 1 + ``after`` tokens)."""
    flush_at: int = 1 << 20
    """Entries held back before a merge: merging touches [d_sae, 2k] tensors, so a few large
    merges cost less than one per batch when d_sae is large."""
    scores: torch.Tensor = field(init=False)
    """[d_sae, k] best scores so far, descending; ``-inf`` where fewer were seen."""
    tokens: torch.Tensor = field(init=False)
    """[d_sae, k] flat token index of each score (-1 where none)."""
    values: torch.Tensor = field(init=False)
    """[d_sae, k] the activation at each kept token (0 where none)."""
    windows: torch.Tensor = field(init=False)
    """[d_sae, k, width] the feature's activations around each kept token (NaN outside its
    sequence)."""

    def __post_init__(self) -> None:
        self.scores = torch.full((self.d_sae, self.k), -torch.inf)
        self.tokens = torch.full((self.d_sae, self.k), -1, dtype=torch.long)
        self.values = torch.zeros(self.d_sae, self.k)
        self.windows = torch.full((self.d_sae, self.k, self.width), torch.nan)
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._n_pending = 0

    @jaxtyped(typechecker=beartype)
    def update(
        self,
        features: Int[torch.Tensor, " n"],
        tokens: Int[torch.Tensor, " n"],
        scores: Float[torch.Tensor, " n"],
        values: Float[torch.Tensor, " n"],
        windows: Float[torch.Tensor, "n width"],
    ) -> None:
        """Add a batch of (feature, flat token, score, value, window) entries, in any order."""
        self._pending.append((features, tokens, scores.float(), values.float(), windows))
        self._n_pending += len(features)
        if self._n_pending >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        """Merge the entries held back into the kept ones."""
        if not self._pending:
            return
        features, tokens, scores, values, windows = (
            torch.cat(c) for c in zip(*self._pending, strict=True)
        )
        self._pending, self._n_pending = [], 0
        chosen, slot = best_per_feature(features, scores, self.k, self.d_sae)
        best_scores = torch.full((self.d_sae, self.k), -torch.inf)
        best_scores[slot] = scores[chosen]
        best_tokens = torch.full((self.d_sae, self.k), -1, dtype=torch.long)
        best_tokens[slot] = tokens[chosen]
        best_values = torch.zeros(self.d_sae, self.k)
        best_values[slot] = values[chosen]
        best_windows = torch.full((self.d_sae, self.k, self.width), torch.nan)
        best_windows[slot] = windows[chosen]
        merged = torch.cat([self.scores, best_scores], dim=1)
        self.scores, pick = merged.topk(self.k, dim=1)
        self.tokens = torch.cat([self.tokens, best_tokens], dim=1).gather(1, pick)
        self.values = torch.cat([self.values, best_values], dim=1).gather(1, pick)
        both = torch.cat([self.windows, best_windows], dim=1)
        self.windows = both.gather(1, pick.unsqueeze(-1).expand(-1, -1, self.width))

    def kept(self, feature: int) -> list[tuple[int, float]]:
        """(flat token, value) of each entry kept for ``feature``, best score first."""
        self.flush()
        rows = zip(
            self.tokens[feature].tolist(),
            self.values[feature].tolist(),
            self.scores[feature].tolist(),
            strict=True,
        )
        return [(t, v) for t, v, s in rows if s > -math.inf]

    def window(self, feature: int, token: int) -> list[float]:
        """The activations around kept ``token`` of ``feature`` (inside its sequence)."""
        self.flush()
        where = (self.tokens[feature] == token).nonzero().flatten()
        if len(where) == 0:
            raise KeyError(f"token {token} is not kept for feature {feature}")
        row = self.windows[feature, int(where[0])]
        return row[~row.isnan()].tolist()


def best_per_feature(
    features: torch.Tensor, scores: torch.Tensor, k: int, d_sae: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The entries among each feature's ``k`` highest scores (scores >= 0), and their
    (feature, rank) slots."""
    # One sort on an int64 key: the feature, then the score descending. A non-negative
    # float32's bit pattern orders as the float does, so the key is exact.
    bits = scores.float().contiguous().view(torch.int32).long()
    order = torch.argsort(features * (1 << 31) + ((1 << 31) - 1 - bits))
    sorted_features = features[order]
    counts = torch.bincount(sorted_features, minlength=d_sae)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(len(order)) - starts[sorted_features]
    keep = rank < k
    return order[keep], (sorted_features[keep], rank[keep])


@dataclass
class FeatureStats:
    """What one pass keeps about every feature of one SAE."""

    d_sae: int
    top_k: int = 20
    """Top-activating tokens kept per feature."""
    n_samples: int = 40
    """Firing tokens sampled uniformly per feature (for the activation bands)."""
    seed: int = 0
    context_size: int = 1
    """Tokens per sequence: windows stop at a sequence's ends."""
    before: int = 0
    """Tokens kept before each example token."""
    after: int = 0
    """Tokens kept after it."""
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
    """Scores are random keys: the firing tokens with the largest keys ever drawn form a
    uniform sample without replacement of every firing token seen."""
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.fired = torch.zeros(self.d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(self.d_sae, dtype=torch.float64)
        self.act_max = torch.zeros(self.d_sae)
        self.histogram = torch.zeros(self.d_sae, HIST_BINS, dtype=torch.long)
        self.l0_counts = torch.zeros(self.d_sae + 1, dtype=torch.long)
        width = self.before + 1 + self.after
        self.top = RunningTopK(self.top_k, self.d_sae, width)
        self.samples = RunningTopK(self.n_samples, self.d_sae, width)
        self._generator = torch.Generator().manual_seed(self.seed)

    @jaxtyped(typechecker=beartype)
    def update(self, acts: Float[torch.Tensor, "tokens d_sae"]) -> None:
        """Add the feature activations of the next ``tokens`` tokens of the pass."""
        acts = acts.detach().float().cpu()
        token_idx, feature_idx = (acts > 0).nonzero(as_tuple=True)
        values = acts[token_idx, feature_idx]
        self.fired += torch.bincount(feature_idx, minlength=self.d_sae)
        self.act_sum += torch.bincount(feature_idx, weights=values.double(), minlength=self.d_sae)
        self.act_max.scatter_reduce_(0, feature_idx, values, reduce="amax")
        l0 = torch.bincount(token_idx, minlength=acts.shape[0])
        self.l0_counts += torch.bincount(l0, minlength=self.d_sae + 1)
        flat = feature_idx * HIST_BINS + log10_bin(values)
        self.histogram += torch.bincount(flat, minlength=self.d_sae * HIST_BINS).view(
            self.d_sae, HIST_BINS
        )
        keys = torch.rand(len(values), generator=self._generator)
        for kept, scores in ((self.top, values), (self.samples, keys)):
            # Only the batch's best k per feature can be kept: their windows are read now,
            # from this batch's activations, so no second pass is needed.
            chosen, _ = best_per_feature(feature_idx, scores, kept.k, self.d_sae)
            kept.update(
                feature_idx[chosen],
                token_idx[chosen] + self.n_tokens,
                scores[chosen],
                values[chosen],
                self._windows(acts, token_idx[chosen], feature_idx[chosen]),
            )
        self.n_tokens += acts.shape[0]

    def _windows(
        self, acts: torch.Tensor, token_idx: torch.Tensor, feature_idx: torch.Tensor
    ) -> torch.Tensor:
        """[n, width] each entry's feature activations around its token, NaN past the ends of
        its sequence (batches hold whole sequences)."""
        if self.n_tokens % self.context_size or acts.shape[0] % self.context_size:
            raise ValueError(
                f"batches must hold whole sequences of context_size={self.context_size} tokens"
            )
        offsets = torch.arange(-self.before, self.after + 1)
        position = (token_idx % self.context_size).unsqueeze(1) + offsets
        inside = (position >= 0) & (position < self.context_size)
        rows = (token_idx - token_idx % self.context_size).unsqueeze(1) + position
        read = acts[rows.clamp(0, acts.shape[0] - 1), feature_idx.unsqueeze(1)]
        return torch.where(inside, read, torch.tensor(torch.nan))

    def top_examples(self, feature: int) -> list[tuple[int, float]]:
        """The feature's top tokens as (flat token index, activation), highest first."""
        return self.top.kept(feature)

    def sampled_examples(self, feature: int) -> list[tuple[int, float]]:
        """The feature's sampled firing tokens as (flat token index, activation)."""
        return self.samples.kept(feature)

    def window(self, feature: int, token: int) -> tuple[int, list[float]]:
        """(first position, activations) of the window around a kept example of ``feature``."""
        self.top.flush()
        kept = self.top if token in self.top.tokens[feature] else self.samples
        position = token % self.context_size
        return max(0, position - self.before), kept.window(feature, token)

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
