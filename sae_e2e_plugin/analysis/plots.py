"""Plots of a sweep: the paper's Pareto curves and dictionary geometry (PNG, matplotlib).

``plot_sweep`` draws, from a sweep's results and its exported SAEs:
  * ``pareto_l0.png``: L0 against CE-loss increase, one line per objective;
  * ``pareto_alive.png``: alive features against CE-loss increase;
  * ``cosine_within.png``: each dictionary's distribution of max cosine similarity between a
    feature and the other features (one run per objective, the runs closest in L0);
  * ``cosine_across.png``: each feature's max cosine similarity with the "local" dictionary;
  * ``training_l0.png``: each run's batch L0 over training (has it settled?).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_e2e_plugin.analysis.geometry import max_cosine_across, max_cosine_within
from sae_e2e_plugin.analysis.results import DERIVED_PREFIXES, RESULT_METRICS, read_training_log
from sae_e2e_plugin.run_files import TRAINING_LOG_FILENAME


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
    chosen = runs_closest_in_l0(rows)
    if chosen:
        decoders = {loss: _decoder(output_dir, row["run_id"]) for loss, row in chosen.items()}
        labels = {loss: f"{loss} (L0 {row['l0']:.1f})" for loss, row in chosen.items()}
        within = {labels[k]: max_cosine_within(w) for k, w in decoders.items()}
        written.append(
            plot_histograms(
                within,
                output_dir / "cosine_within.png",
                "max cosine similarity with another feature of the same dictionary",
            )
        )
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
    """``y`` against ``x``, one marker line per objective (``loss``), points sorted by ``x``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label in sorted({series_label(r) for r in rows}):
        points = sorted(
            (r[x], r[y])
            for r in rows
            if series_label(r) == label and r.get(x) is not None and r.get(y) is not None
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel(_LABELS.get(x, x))
    ax.set_ylabel(_LABELS.get(y, y))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def series_label(row: dict[str, Any]) -> str:
    """The line a run belongs to: its objective, plus any grid value other than the sparsity
    coefficient (e.g. ``local (training_tokens=409600)``)."""
    others = [
        f"{key.split('.')[-1]}={value}"
        for key, value in row.items()
        if key not in ("run_id", "loss", "sae.l1_coefficient")
        and key not in RESULT_METRICS
        and not key.startswith(DERIVED_PREFIXES)
    ]
    loss = str(row.get("loss", "run"))
    return f"{loss} ({', '.join(others)})" if others else loss


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


_LABELS = {
    "l0": "L0 (active features per token)",
    "alive_features": "alive features",
    "ce_loss_increase": "CE-loss increase (nats)",
}


def _decoder(output_dir: Path, run_id: str) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(output_dir / "runs" / run_id / "sae_weights.safetensors")
    return weights["W_dec"].float()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'sae-e2e-plugin[demo]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
