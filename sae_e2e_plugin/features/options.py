"""What ``inspect_sae`` is asked to show, and which features get a page."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SELECTIONS = ("random", "frequent", "important", "ids")


@dataclass(frozen=True)
class InspectOptions:
    """How many examples to keep and which features get a page."""

    select: str = "random"
    """Which features get a page: ``random`` (a random sample of the features that fired),
    ``frequent`` (those that fired most often), ``important`` (largest ablation effect: costs
    one patched run per context of every feature that fired), ``ids`` (``feature_ids``)."""
    n_features: int = 100
    """How many features get a page (not for ``select="ids"``)."""
    feature_ids: tuple[int, ...] = ()
    """The features to show with ``select="ids"``."""
    top_k: int = 20
    """Top-activating contexts kept per feature."""
    n_samples: int = 40
    """Firing tokens sampled uniformly per feature, shown in activation bands."""
    samples_per_band: int = 5
    """Sampled contexts shown in each of the four bands (quarters of the feature's maximum)."""
    before: int = 12
    """Tokens shown before each example token."""
    after: int = 4
    """Tokens shown after it."""
    ablation_contexts: int = 2
    """Top contexts on which each shown feature is ablated (0: no ablation effect). Each costs
    one run of the model from the hook on, the clean one and the prefix before the hook."""
    logit_k: int = 10
    """Tokens listed as most raised and most lowered by each feature's decoder direction."""
    batch_size: int = 8
    """Sequences per model run."""
    seed: int = 0
    """Seed of the random selection and of the sampled contexts."""
    no_match_below: float = 0.7
    """Cosine under which a feature of A has no close match in the compared SAE."""

    def check(self, d_sae: int) -> None:
        """Refuse options that cannot be met, naming the option and the fix."""
        if self.select not in SELECTIONS:
            raise ValueError(f"select={self.select!r} is not one of {list(SELECTIONS)}.")
        for name in ("n_features", "top_k", "n_samples", "samples_per_band", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("before", "after", "ablation_contexts", "logit_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.ablation_contexts > self.top_k:
            raise ValueError(
                f"ablation_contexts={self.ablation_contexts} exceeds top_k={self.top_k}: the "
                "ablation runs on top contexts. Lower ablation_contexts or raise top_k."
            )
        if not -1.0 <= self.no_match_below <= 1.0:
            raise ValueError(
                f"no_match_below must be a cosine in [-1, 1], got {self.no_match_below}."
            )
        if self.select == "ids" and not self.feature_ids:
            raise ValueError("select='ids' needs feature_ids (--features 3,17,42).")
        if self.select != "ids" and self.feature_ids:
            raise ValueError("feature_ids is given but select is not 'ids'; use one of the two.")
        outside = [i for i in self.feature_ids if not 0 <= i < d_sae]
        if outside:
            raise ValueError(
                f"feature_ids {outside} are outside the SAE's features 0..{d_sae - 1}."
            )


def select_features(
    options: InspectOptions, fired: torch.Tensor, importance: dict[int, float] | None = None
) -> list[int]:
    """The features that get a page, in the order the index lists them."""
    if options.select == "ids":
        return sorted(set(options.feature_ids))
    alive = fired.nonzero().flatten()
    n = min(options.n_features, len(alive))
    if options.select == "frequent":
        order = fired[alive].argsort(descending=True, stable=True)
        return alive[order[:n]].tolist()
    if options.select == "important":
        assert importance is not None
        return sorted(importance, key=lambda f: (-importance[f], f))[:n]
    generator = torch.Generator().manual_seed(options.seed)
    picked = alive[torch.randperm(len(alive), generator=generator)[:n]]
    return sorted(picked.tolist())
