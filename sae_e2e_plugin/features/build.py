"""``inspect_sae``: one pass over the tokens, the chosen features' examples, logit tables and
ablation effects, an optional second dictionary matched by decoder cosine, and the static site
written (``features.site``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_e2e_plugin.features import ablation
from sae_e2e_plugin.features.compare import Matches, nearest_by_cosine
from sae_e2e_plugin.features.logits import LogitEffects, logit_effects, model_unembedding
from sae_e2e_plugin.features.options import InspectOptions, select_features
from sae_e2e_plugin.features.passes import (
    Dictionary,
    Progress,
    Window,
    WindowRequest,
    collect_stats,
    plan_dictionary,
    window_of,
)
from sae_e2e_plugin.features.stats import FeatureStats


@dataclass
class Inspection:
    """Everything the site shows about one SAE (and the one it is compared with)."""

    stats: FeatureStats
    tokens: torch.Tensor
    """[sequences, positions] the tokens read."""
    ablation_contexts: int
    """Top contexts each ablation effect is averaged over (at most)."""
    selected: list[int]
    windows: dict[WindowRequest, Window]
    shown_samples: dict[int, list[list[WindowRequest]]]
    """Per selected feature, the sampled examples shown in each activation band."""
    ablation: dict[int, float]
    logits: LogitEffects | None
    compare_stats: FeatureStats | None = None
    matches: Matches | None = None
    compare_windows: dict[WindowRequest, Window] = field(default_factory=dict)


@contextmanager
def _progress(show: bool, total: int, unit: str, description: str) -> Iterator[Progress]:
    with tqdm(total=total, unit=unit, desc=description, disable=not show) as bar:
        yield bar.update


def inspect_features(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    *,
    compare: Any = None,
    options: InspectOptions | None = None,
    hook_name: str | None = None,
    show_progress: bool = False,
) -> Inspection:
    """Run the passes and gather what the site shows (``inspect_sae`` also writes it)."""
    options = options or InspectOptions()
    options.check(sae.cfg.d_sae)
    _check_tokens(tokens)
    dictionaries = [plan_dictionary(model, sae, hook_name)]
    if compare is not None:
        dictionaries.append(plan_dictionary(model, compare))
    stats = [
        FeatureStats(
            d.sae.cfg.d_sae,
            options.top_k,
            options.n_samples,
            options.seed,
            context_size=tokens.shape[1],
            before=options.before,
            after=options.after,
        )
        for d in dictionaries
    ]
    with _progress(show_progress, tokens.numel(), "tok", "features") as progress:
        collect_stats(model, dictionaries, tokens, stats, options.batch_size, progress)
    main, main_stats = dictionaries[0], stats[0]
    importance = None
    if options.select == "important":
        alive = main_stats.fired.nonzero().flatten().tolist()
        importance = _ablation_effects(
            model, main, tokens, main_stats, alive, options, show_progress
        )
    selected = select_features(options, main_stats.fired, importance)
    effects = importance or _ablation_effects(
        model, main, tokens, main_stats, selected, options, show_progress
    )
    shown_samples = {f: _sample_bands(main_stats, f, options) for f in selected}
    requests = [
        WindowRequest(f, token) for f in selected for token, _ in main_stats.top_examples(f)
    ] + [r for bands in shown_samples.values() for band in bands for r in band]
    windows = {request: window_of(main_stats, tokens, request) for request in requests}
    inspection = Inspection(
        stats=main_stats,
        tokens=tokens,
        ablation_contexts=options.ablation_contexts,
        selected=selected,
        windows=windows,
        shown_samples=shown_samples,
        ablation={f: effects[f] for f in selected if f in effects},
        logits=_logits(model, sae, selected, options),
    )
    if compare is not None:
        _add_comparison(inspection, model, sae, dictionaries[1], stats[1], tokens, options)
    return inspection


def _check_tokens(tokens: Any) -> None:
    integer = isinstance(tokens, torch.Tensor) and not (
        tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool
    )
    if not integer or tokens.ndim != 2 or min(tokens.shape) < 1:
        raise ValueError(
            "tokens must be an integer tensor of shape (sequences, positions) with at least "
            f"one of each, got {getattr(tokens, 'shape', type(tokens).__name__)}."
        )


def _ablation_effects(
    model: Any,
    dictionary: Dictionary,
    tokens: torch.Tensor,
    stats: FeatureStats,
    features: list[int],
    options: InspectOptions,
    show_progress: bool,
) -> dict[int, float]:
    if options.ablation_contexts == 0 or _is_transcoder(dictionary.sae):
        return {}
    contexts = [
        ablation.AblationContext(f, token)
        for f in features
        for token, _ in stats.top_examples(f)[: options.ablation_contexts]
    ]
    with _progress(show_progress, len(contexts), "ctx", "ablation") as progress:
        kls = ablation.ablation_kls(
            model, dictionary, tokens, contexts, options.batch_size, progress
        )
    return ablation.mean_effects(contexts, kls)


def _is_transcoder(sae: Any) -> bool:
    # A transcoder writes at another hook than it reads: removing its feature at the read
    # hook would not be the feature's effect.
    from sae_lens.saes.transcoder import Transcoder

    return isinstance(sae, Transcoder)


def _sample_bands(
    stats: FeatureStats, feature: int, options: InspectOptions
) -> list[list[WindowRequest]]:
    """The sampled examples in four bands by activation (quarters of the feature's maximum,
    highest first), up to ``samples_per_band`` each."""
    top = float(stats.act_max[feature])
    bands: list[list[WindowRequest]] = [[] for _ in range(4)]
    for token, value in stats.sampled_examples(feature):
        band = min(3, int(4 * value / top)) if top > 0 else 0
        if len(bands[3 - band]) < options.samples_per_band:
            bands[3 - band].append(WindowRequest(feature, token))
    return bands


def _logits(
    model: Any, sae: Any, selected: list[int], options: InspectOptions
) -> LogitEffects | None:
    unembedding = model_unembedding(model)
    if unembedding is None or options.logit_k == 0:
        return None
    if sae.W_dec.shape[1] != unembedding.w_u.shape[0]:
        return None  # not a residual-stream dictionary: no logit table (the page says so)
    k = min(options.logit_k, unembedding.w_u.shape[1])
    return logit_effects(sae.W_dec.detach(), selected, unembedding, k)


def _add_comparison(
    inspection: Inspection,
    model: Any,
    sae: Any,
    other: Dictionary,
    other_stats: FeatureStats,
    tokens: torch.Tensor,
    options: InspectOptions,
) -> None:
    matches = nearest_by_cosine(sae.W_dec.detach().float(), other.sae.W_dec.detach().float())
    inspection.matches = matches
    inspection.compare_stats = other_stats
    matched = sorted({int(matches.nearest[f]) for f in inspection.selected})
    requests = [
        WindowRequest(g, token) for g in matched for token, _ in other_stats.top_examples(g)
    ]
    inspection.compare_windows = {r: window_of(other_stats, tokens, r) for r in requests}
