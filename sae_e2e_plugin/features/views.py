"""What each page shows, as plain values for the templates: numbers exactly as computed
(templates format them for reading and keep the raw value in a ``data-value`` attribute)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from sae_e2e_plugin.features.build import Inspection
from sae_e2e_plugin.features.passes import Window, WindowRequest
from sae_e2e_plugin.features.stats import bin_edges

TokenText = Callable[[int], str]
DENSE_ABOVE = 0.1
"""A feature firing on more than this share of tokens is listed as dense."""
SHADES = 9
"""Shading levels of a token by activation (``a1``..``a9``; ``a0``: not firing)."""
BAND_LABELS = ("75–100 % of max", "50–75 % of max", "25–50 % of max", "0–25 % of max")
NO_MATCH_LISTED = 1000
"""Features without a close match listed on the comparison page at most."""


def token_texts(tokenizer: Any) -> TokenText:
    """A token id's text as shown (newlines and tabs made visible), cached."""
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            raw = tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"
            cache[token_id] = raw.replace("\n", "↵").replace("\t", "⇥") or "∅"
        return cache[token_id]

    return text


def example(
    window: Window, token: int, value: float, peak: float, text: TokenText
) -> dict[str, Any]:
    """One context: its tokens shaded by activation relative to the feature's maximum."""
    tokens = []
    for offset, (token_id, act) in enumerate(zip(window.token_ids, window.acts, strict=True)):
        level = 0 if act <= 0 or peak <= 0 else max(1, min(SHADES, math.ceil(SHADES * act / peak)))
        center = window.start + offset == window.position
        tokens.append({"text": text(token_id), "act": act, "level": level, "center": center})
    return {"token": token, "value": value, "tokens": tokens}


def top_tokens(stats: Any, tokens: torch.Tensor, text: TokenText) -> list[str]:
    """Per feature, the distinct texts of the tokens of its three highest activations."""
    stats.top.flush()
    n = min(3, stats.top.k)
    kept = stats.top.tokens[:, :n]
    ids = torch.where(kept >= 0, tokens.reshape(-1)[kept.clamp(min=0)], -1).tolist()
    firing = (stats.top.scores[:, :n] > -torch.inf).tolist()
    shown = []
    for row, alive in zip(ids, firing, strict=True):
        texts = [text(i) for i, a in zip(row, alive, strict=True) if a]
        shown.append(" · ".join(dict.fromkeys(texts)))
    return shown


def histogram(counts: list[int], labels: list[str]) -> dict[str, list[Any]]:
    """Counts and bin labels trimmed to the bins from the first to the last non-zero one."""
    used = [i for i, c in enumerate(counts) if c]
    if not used:
        return {"counts": [], "labels": []}
    lo, hi = used[0], used[-1] + 1
    return {"counts": counts[lo:hi], "labels": labels[lo:hi]}


def activation_histogram(stats: Any, feature: int) -> dict[str, list[Any]]:
    edges = bin_edges()
    labels = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(len(edges) - 1)]
    return histogram(stats.histogram[feature].tolist(), labels)


def frequency_histogram(freq: torch.Tensor, bins_per_decade: int = 4) -> dict[str, list[Any]]:
    """Log10 firing frequencies of the features that fired."""
    alive = freq[freq > 0]
    if len(alive) == 0:
        return {"counts": [], "labels": []}
    low = math.floor(float(alive.min().log10()) * bins_per_decade) / bins_per_decade
    n = max(1, math.ceil(-low * bins_per_decade) + 1)
    index = ((alive.log10() - low) * bins_per_decade).floor().long().clamp(0, n - 1)
    counts = torch.bincount(index, minlength=n).tolist()
    labels = [f"10^{low + i / bins_per_decade:.2f}" for i in range(n)]
    return histogram(counts, labels)


def l0_histogram(l0_counts: torch.Tensor, max_bars: int = 64) -> dict[str, list[Any]]:
    """Tokens by L0, in at most ``max_bars`` bars of equal width over the L0s seen."""
    used = l0_counts.nonzero().flatten()
    if len(used) == 0:
        return {"counts": [], "labels": []}
    low, high = int(used[0]), int(used[-1]) + 1
    width = max(1, math.ceil((high - low) / max_bars))
    counts = l0_counts[low:high]
    counts = torch.nn.functional.pad(counts, (0, (-len(counts)) % width))
    bars = counts.view(-1, width).sum(1).tolist()
    labels = [
        f"L0 {low + i * width}"
        if width == 1
        else f"L0 {low + i * width}–{low + (i + 1) * width - 1}"
        for i in range(len(bars))
    ]
    return {"counts": bars, "labels": labels}


def feature_page(
    inspection: Inspection,
    feature: int,
    neighbours: tuple[int | None, int | None],
    text: TokenText,
) -> dict[str, Any]:
    """Everything one feature's page shows."""
    stats = inspection.stats
    peak = float(stats.act_max[feature])
    fired = int(stats.fired[feature])

    def shown(request: WindowRequest, value: float) -> dict[str, Any]:
        return example(inspection.windows[request], request.token, value, peak, text)

    sample_values = dict(stats.sampled_examples(feature))
    page: dict[str, Any] = {
        "id": feature,
        "prev": neighbours[0],
        "next": neighbours[1],
        "freq": float(stats.frequency[feature]),
        "fired": fired,
        "max": peak,
        "mean": float(stats.act_sum[feature]) / fired if fired else 0.0,
        "ablation": inspection.ablation.get(feature),
        "ablation_n": min(inspection.ablation_contexts, len(stats.top_examples(feature))),
        "hist": activation_histogram(stats, feature),
        "top": [shown(WindowRequest(feature, t), v) for t, v in stats.top_examples(feature)],
        "bands": [
            {"label": label, "examples": [shown(r, sample_values[r.token]) for r in band]}
            for label, band in zip(BAND_LABELS, inspection.shown_samples[feature], strict=True)
        ],
        "raised": [],
        "lowered": [],
        "match": _match(inspection, feature, text),
    }
    if inspection.logits is not None:
        row = inspection.selected.index(feature)
        effects = inspection.logits
        for key, ids, values in (
            ("raised", effects.raised_ids, effects.raised),
            ("lowered", effects.lowered_ids, effects.lowered),
        ):
            page[key] = [
                {"id": int(i), "text": text(int(i)), "value": float(v)}
                for i, v in zip(ids[row], values[row], strict=True)
            ]
    return page


def _match(inspection: Inspection, feature: int, text: TokenText) -> dict[str, Any] | None:
    if inspection.matches is None or inspection.compare_stats is None:
        return None
    other = int(inspection.matches.nearest[feature])
    stats = inspection.compare_stats
    peak = float(stats.act_max[other])
    return {
        "id": other,
        "cosine": float(inspection.matches.cosine[feature]),
        "freq": float(stats.frequency[other]),
        "top": [
            example(inspection.compare_windows[WindowRequest(other, t)], t, v, peak, text)
            for t, v in stats.top_examples(other)
        ],
    }


def comparison(inspection: Inspection, threshold: float, name: str) -> dict[str, Any] | None:
    """The comparison page: the maxima's distribution and the features with no close match."""
    if inspection.matches is None or inspection.compare_stats is None:
        return None
    cosine = inspection.matches.cosine
    below = (cosine < threshold).nonzero().flatten()
    order = below[cosine[below].argsort(stable=True)][:NO_MATCH_LISTED].tolist()
    pages = set(inspection.selected)
    freq = inspection.stats.frequency
    edges = [-1 + i / 20 for i in range(41)]
    return {
        "name": name,
        "d_sae": inspection.compare_stats.d_sae,
        "threshold": threshold,
        "median": float(cosine.median()),
        "no_match": len(below),
        "listed": len(order),
        "hist": histogram(
            torch.histc(cosine.float(), bins=40, min=-1.0, max=1.0).long().tolist(),
            [f"{edges[i]:.2f}–{edges[i + 1]:.2f}" for i in range(40)],
        ),
        "rows": [
            {
                "id": f,
                "nearest": int(inspection.matches.nearest[f]),
                "cosine": float(cosine[f]),
                "freq": float(freq[f]),
                "page": f in pages,
            }
            for f in order
        ],
    }
