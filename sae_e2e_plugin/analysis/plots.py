"""Plots of a sweep: the paper's Pareto curves and dictionary geometry (PNG, matplotlib).

``plot_sweep`` draws, from a sweep's results and its exported SAEs:
  * ``pareto_l0.png``: L0 against CE-loss increase, one line per objective (runs repeated with
    other seeds: their mean, with bars over the seeds' range);
  * ``pareto_alive.png``: alive features against CE-loss increase;
  * ``cosine_within.png``: each dictionary's distribution of max cosine similarity between a
    feature and the other features (one run per objective, the runs closest in L0);
  * ``cosine_across.png``: each feature's max cosine similarity with the "local" dictionary;
  * ``training_l0.png``: each run's batch L0 over training (has it settled?).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_WEIGHTS_FILENAME

from sae_e2e_plugin.analysis.geometry import max_cosine_across, max_cosine_within
from sae_e2e_plugin.analysis.results import read_training_log, series_label
from sae_e2e_plugin.analysis.seeds import seed_means
from sae_e2e_plugin.run_files import TRAINING_LOG_FILENAME, atomic_write_bytes

logger = logging.getLogger(__name__)

OBJECTIVE_COLORS = {"local": "tab:orange", "e2e": "tab:blue", "e2e_downstream": "tab:green"}
"""Each objective's colour in the Pareto plots (matplotlib's default cycle, fixed per objective)."""


def plot_sweep(output_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Draw every plot that the results support; return the files written."""
    written = []
    for y_key, name in (("l0", "pareto_l0.png"), ("alive_features", "pareto_alive.png")):
        written.append(plot_pareto(rows, x=y_key, y="ce_loss_increase", path=output_dir / name))
    logs = {
        row["run_id"]: read_training_log(
            output_dir / "runs" / row["run_id"] / TRAINING_LOG_FILENAME
        )
        for row in rows
    }
    if any(logs.values()):
        written.append(plot_training_l0(rows, logs, output_dir / "training_l0.png"))
    written += plot_geometry(output_dir, runs_closest_in_l0(rows))
    return written


def plot_geometry(output_dir: Path, chosen: dict[str, dict[str, Any]]) -> list[Path]:
    """``cosine_within.png`` and ``cosine_across.png`` of the ``chosen`` run per objective.
    Drawn only when every chosen run still has its weights: a sweep whose weights were not kept
    (a clone of a repository that commits runs without them) keeps the plots it has rather than
    drawing others from a different choice of runs."""
    missing = [row["run_id"] for row in chosen.values() if not _weights(output_dir, row).exists()]
    if not chosen or missing:
        if missing:
            logger.warning(f"no SAE weights in runs {missing}: cosine plots left as they are")
        return []
    decoders = {loss: _decoder(_weights(output_dir, row)) for loss, row in chosen.items()}
    labels = {loss: f"{loss} (L0 {row['l0']:.1f})" for loss, row in chosen.items()}
    within = {labels[k]: max_cosine_within(w) for k, w in decoders.items()}
    written = [
        plot_histograms(
            within,
            output_dir / "cosine_within.png",
            "max cosine similarity with another feature of the same dictionary",
        )
    ]
    if "local" in decoders and len(decoders) > 1:
        across = {
            labels[k]: max_cosine_across(w, decoders["local"])
            for k, w in decoders.items()
            if k != "local"
        }
        written.append(
            plot_histograms(
                across,
                output_dir / "cosine_across.png",
                "max cosine similarity with a feature of the local dictionary",
            )
        )
    return written


def runs_closest_in_l0(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One finished run per objective, each the closest to the median L0 of all runs."""
    with_l0 = [r for r in rows if r.get("l0") is not None and "loss" in r]
    if not with_l0:
        return {}
    target = float(torch.tensor([r["l0"] for r in with_l0]).median())
    chosen: dict[str, dict[str, Any]] = {}
    for row in with_l0:
        best = chosen.get(row["loss"])
        if best is None or abs(row["l0"] - target) < abs(best["l0"] - target):
            chosen[row["loss"]] = row
    return chosen


def plot_pareto(rows: list[dict[str, Any]], x: str, y: str, path: Path) -> Path:
    """``y`` against ``x``, one marker line per curve (``series_label``) through its grid
    points' seed means, sorted by ``x``; a point run with several seeds has bars from its
    seeds' min to max on both axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = seed_means(rows)
    colors = series_colors(points)
    for label, color in colors.items():
        ordered = sorted((p for p in points if series_label(p) == label), key=lambda p: p[x])
        xs, ys = [p[x] for p in ordered], [p[y] for p in ordered]
        (line,) = ax.plot(xs, ys, marker="o", label=label, color=color)
        repeated = [p for p in ordered if p["n_seeds"] > 1]
        if repeated:
            ax.errorbar(
                [p[x] for p in repeated],
                [p[y] for p in repeated],
                xerr=_bars(repeated, x),
                yerr=_bars(repeated, y),
                fmt="none",
                ecolor=line.get_color(),
                capsize=3,
            )
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def series_colors(points: list[dict[str, Any]]) -> dict[str, str | None]:
    """Each curve's colour, by label in sorted order: an objective's first curve takes
    ``OBJECTIVE_COLORS``' (so every sweep's plots agree), later curves of the same objective
    (another ``training_tokens``, say) None, matplotlib's next colour."""
    colors: dict[str, str | None] = {}
    taken: set[str] = set()
    for label in sorted({series_label(point) for point in points}):
        loss = next(str(p.get("loss")) for p in points if series_label(p) == label)
        colors[label] = OBJECTIVE_COLORS.get(loss) if loss not in taken else None
        taken.add(loss)
    return colors


def _bars(points: list[dict[str, Any]], metric: str) -> list[list[float]]:
    # matplotlib's asymmetric error bars: distances below and above the mean.
    below = [p[metric] - p["spread"][metric][1] for p in points]
    above = [p["spread"][metric][2] - p[metric] for p in points]
    return [below, above]


def plot_training_l0(
    rows: list[dict[str, Any]], logs: dict[str, list[dict[str, Any]]], path: Path
) -> Path:
    """Batch L0 against tokens seen, one line per run, one colour per objective."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = {loss: f"C{i}" for i, loss in enumerate(sorted({str(r.get("loss")) for r in rows}))}
    labelled: set[str] = set()
    for row in rows:
        log = [entry for entry in logs.get(row["run_id"], []) if "l0" in entry]
        if not log:
            continue
        loss = str(row.get("loss"))
        ax.plot(
            [e["tokens"] for e in log],
            [e["l0"] for e in log],
            color=colours[loss],
            alpha=0.8,
            linewidth=1,
            label=None if loss in labelled else loss,
        )
        labelled.add(loss)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("L0 of the training batch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_histograms(series: dict[str, torch.Tensor], path: Path, xlabel: str) -> Path:
    """Overlaid histograms of values in [-1, 1] (one per series)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, values in series.items():
        ax.hist(values.numpy(), bins=50, range=(-0.2, 1.0), alpha=0.5, label=label, density=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


_LABELS = {
    "l0": "L0 (active features per token)",
    "alive_features": "alive features",
    "ce_loss_increase": "CE-loss increase (nats)",
}


def _weights(output_dir: Path, row: dict[str, Any]) -> Path:
    return output_dir / "runs" / row["run_id"] / SAE_WEIGHTS_FILENAME


def _decoder(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["W_dec"].float()


def _save(fig: Any, path: Path) -> Path:
    # Rendered in memory and renamed into place: a sweep killed mid-plot leaves the old PNG.
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    _pyplot().close(fig)
    return atomic_write_bytes(path, png.getvalue())


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'sae-e2e-plugin[demo]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
