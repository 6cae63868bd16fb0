"""``inspect_sae``: the Python entry point of ``sae-e2e inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_e2e_plugin.features.build import inspect_features
from sae_e2e_plugin.features.options import InspectOptions
from sae_e2e_plugin.features.site import check_out_folder, write_site


def inspect_sae(
    sae: Any,
    model: Any,
    tokens: torch.Tensor,
    out: str | Path,
    *,
    compare: Any = None,
    options: InspectOptions | None = None,
    hook_name: str | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
    compare_name: str | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> Path:
    """Write a static site of ``sae``'s features on ``tokens`` [sequences, positions] to ``out``.

    The model runs only up to the SAE's hook for the statistics; the chosen features' pages
    add their logit tables and ablation effects. ``compare``: a second SAE at the same kind of
    activation, matched feature by feature by decoder cosine. ``metrics``: an evaluation's
    numbers shown on the index (e.g. the ``eval.json`` beside the SAE). ``tokenizer``: what
    turns token ids into text (default: the model's). Returns ``out``.
    """
    out = Path(out)
    options = options or InspectOptions()
    check_out_folder(out, overwrite)  # before the passes: a refused folder costs nothing
    inspection = inspect_features(
        sae,
        model,
        tokens,
        compare=compare,
        options=options,
        hook_name=hook_name,
        show_progress=show_progress,
    )
    meta = sae.cfg.metadata
    facts = {
        "name": name or "SAE",
        "model_name": meta.model_name or type(model).__name__,
        "hook_name": hook_name or meta.hook_name,
        "select": options.select,
        "compare_name": compare_name or "the compared SAE",
        "no_match_below": options.no_match_below,
    }
    return write_site(
        inspection,
        out,
        tokenizer=tokenizer if tokenizer is not None else getattr(model, "tokenizer", None),
        facts=facts,
        metrics=metrics,
        overwrite=overwrite,
    )
