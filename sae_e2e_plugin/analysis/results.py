"""Results of finished runs: one row per run folder (its grid values, ``eval.json`` metrics, its
dictionary's geometry, L0 settling and training time from ``training_log.jsonl``), written as
CSV, JSON and a markdown table.

Sweeps write these files and the plots read them; both take the file names from here.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
from pathlib import Path
from typing import Any

from sae_lens.constants import SAE_WEIGHTS_FILENAME
from safetensors.torch import load_file

from sae_e2e_plugin.analysis.geometry import within_summary
from sae_e2e_plugin.analysis.matched_l0 import gap_closed
from sae_e2e_plugin.config_files import load_json_file
from sae_e2e_plugin.run_files import (
    EVAL_FILENAME,
    GEOMETRY_FILENAME,
    TRAINING_LOG_FILENAME,
    atomic_write_text,
)

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Metrics copied from eval.json into the results table.
RESULT_METRICS = (
    "l0",
    "alive_features",
    "alive_fraction",
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_increase",
    "ce_loss_score",
    "kl_orig_patched",
    "kl_score",
    "explained_variance",
    "n_tokens",
)


def run_row(run_dir: Path, run_id: str, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The results row of one run folder (None while it has no ``eval.json``)."""
    eval_file = run_dir / EVAL_FILENAME
    if not eval_file.exists():
        return None
    metrics = load_json_file(
        eval_file, "Remove it and run `sae-e2e sweep --reevaluate` to evaluate the run again."
    )
    row: dict[str, Any] = {"run_id": run_id, **overrides}
    row.update({name: metrics.get(name) for name in RESULT_METRICS})
    row.update(geometry_summary(run_dir))
    row.update(training_l0_summary(run_dir / TRAINING_LOG_FILENAME))
    row.update(training_loss_summary(run_dir / TRAINING_LOG_FILENAME))
    row.update(training_time_summary(run_dir / TRAINING_LOG_FILENAME))
    return row


GEOMETRY_METRICS = ("max_cosine_median", "near_duplicate_fraction")
"""The dictionary-geometry columns of a results row (``analysis.geometry.within_summary``)."""


def geometry_summary(run_dir: Path) -> dict[str, float | None]:
    """The run's dictionary geometry from ``GEOMETRY_FILENAME``, computed from its weights and
    written there first when it is missing or describes other weights. Without weights the
    file's numbers stand (its weights were not kept); without either, None."""
    record_path, weights_path = run_dir / GEOMETRY_FILENAME, run_dir / SAE_WEIGHTS_FILENAME
    try:
        record = load_json_file(record_path) if record_path.exists() else None
    except ValueError:  # damaged: recomputed from the weights below, when they are kept
        record = None
    if weights_path.exists():
        digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        if record is None or record.get("weights_sha256") != digest:
            w_dec = load_file(weights_path)["W_dec"].float()
            record = {**within_summary(w_dec), "weights_sha256": digest}
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    return {name: record.get(name) if record else None for name in GEOMETRY_METRICS}


def write_results(output_dir: Path, rows: list[dict[str, Any]], sections: str = "") -> None:
    """``results.json`` always; ``results.csv`` and ``results.md`` (the table, then
    ``sections``, more markdown) when there are rows."""
    atomic_write_text(output_dir / RESULTS_JSON, json.dumps(rows, indent=2) + "\n")
    if rows:
        table = io.StringIO(newline="")
        # Grids of a list may set different fields: every column, blank where unset.
        writer = csv.DictWriter(table, fieldnames=_all_keys(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(output_dir / RESULTS_CSV, table.getvalue())
        atomic_write_text(output_dir / RESULTS_MD, results_markdown(rows) + sections)


DERIVED_PREFIXES = (
    *GEOMETRY_METRICS,
    "l0_train_",
    "loss_train_",
    "train_seconds",
    "step_seconds_",
    "gap_closed",
    "n_seeds",
    "spread",
)
"""Keys of a results row computed here or from several rows (``analysis.seeds``): not grid
values, not eval.json metrics."""

SEED_KEY = "seed"
"""The grid field that repeats a run (SAELens' ``seed``: SAE initialisation, batch order)."""


def with_gap_closed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of schedule runs (``e2e_fraction`` < 1) gain ``gap_closed``: how much of the CE-loss
    gap between the sweep's local and full-e2e runs they close at their L0
    (``analysis.matched_l0``; None where those runs do not reach it). Other rows are unchanged.
    """

    def points(loss: str) -> list[tuple[float, float]]:
        return [
            (row["l0"], row["ce_loss_increase"])
            for row in rows
            if row.get("loss") == loss and row.get("e2e_fraction", 1.0) == 1.0
            if row.get("l0") is not None and row.get("ce_loss_increase") is not None
        ]

    local, e2e = points("local"), points("e2e")
    out = []
    for row in rows:
        if row.get("e2e_fraction", 1.0) < 1.0 and row.get("l0") is not None:
            run = (row["l0"], row["ce_loss_increase"])
            row = {**row, "gap_closed": gap_closed(run, local, e2e)}
        out.append(row)
    return out


# (column title, results key, format) of the markdown table.
_TABLE_COLUMNS = (
    ("L0", "l0", "{:.1f}"),
    ("alive", "alive_features", "{:.0f}"),
    ("CE increase", "ce_loss_increase", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    ("KL", "kl_orig_patched", "{:.3f}"),
    ("expl. var.", "explained_variance", "{:.3f}"),
    ("median max cos", "max_cosine_median", "{:.3f}"),
    ("near-dup.", "near_duplicate_fraction", "{:.1%}"),
    ("L0 drift, last tenth", "l0_train_drift", "{:+.1%}"),
    ("loss drift, last tenth", "loss_train_drift", "{:+.1%}"),
    ("training time (s)", "train_seconds", "{:.0f}"),
    ("gap closed", "gap_closed", "{:.0%}"),
)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table: grid values, then metrics; by objective, then L0."""
    keys = grid_keys(rows)
    # A column no row has (no schedule runs, an old log without times) is left out.
    columns = [c for c in _TABLE_COLUMNS if any(row.get(c[1]) is not None for row in rows)]
    titles = [short_key(k) for k in keys] + [title for title, _, _ in columns]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    ordered = sorted(rows, key=lambda r: (str(r.get("loss")), -(r.get("l0") or 0.0)))
    for row in ordered:
        cells = [str(row[k]) if k in row else "–" for k in keys]
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def grid_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The grid fields the rows set (not ``run_id``, metrics or derived keys), in first-seen
    order."""
    return [
        key
        for key in _all_keys(rows)
        if key != "run_id" and key not in RESULT_METRICS and not key.startswith(DERIVED_PREFIXES)
    ]


def _all_keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``training_log.jsonl`` (empty if it has none)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:  # a row cut short by a full disk or a kill: not a step's numbers
            continue
    return rows


def training_l0_summary(path: Path) -> dict[str, float | None]:
    """Whether L0 had settled by the end of training, from the run's training log.

    ``l0_train_end``: the mean batch L0 over the last tenth of the steps;
    ``l0_train_drift``: its relative change from the tenth before (0 = flat;
    -0.1 = still falling by 10% per tenth of the run).
    """
    l0 = [row["l0"] for row in read_training_log(path) if "l0" in row]
    return _last_tenth("l0_train", l0)


def training_loss_summary(path: Path) -> dict[str, float | None]:
    """Whether the training loss had settled: ``loss_train_end`` and ``loss_train_drift`` as
    for L0, over the steps of the run's last phase (a schedule's e2e steps), from each row's
    ``total_loss``. With a top-k SAE, whose batch L0 is fixed, this is what says whether the
    run had converged."""
    rows = [row for row in read_training_log(path) if "total_loss" in row]
    last_phase = rows[-1].get("phase") if rows else None
    losses = [row["total_loss"] for row in rows if row.get("phase") == last_phase]
    return _last_tenth("loss_train", losses)


def _last_tenth(name: str, values: list[float]) -> dict[str, float | None]:
    tenth = len(values) // 10
    if tenth == 0:
        return {f"{name}_end": None, f"{name}_drift": None}
    last = sum(values[-tenth:]) / tenth
    before = sum(values[-2 * tenth : -tenth]) / tenth
    return {f"{name}_end": last, f"{name}_drift": (last - before) / before if before else None}


def training_time_summary(path: Path) -> dict[str, float | None]:
    """Where a run's training time went, from the ``seconds`` of its training log's rows.

    ``train_seconds``: their sum (the training loop, checkpoints and periodic evaluations; not
    loading the model or the final evaluation); ``step_seconds_local`` / ``step_seconds_e2e``:
    the median step of each phase (None without such steps). Medians, because a checkpoint or a
    busy machine makes single steps slow. None throughout for a log written before the rows
    carried ``seconds``.
    """
    rows = [row for row in read_training_log(path) if "seconds" in row]
    if not rows:
        return {"train_seconds": None, "step_seconds_local": None, "step_seconds_e2e": None}
    summary: dict[str, float | None] = {"train_seconds": sum(row["seconds"] for row in rows)}
    for phase in ("local", "e2e"):
        times = [row["seconds"] for row in rows if row.get("phase", "e2e") == phase]
        summary[f"step_seconds_{phase}"] = statistics.median(times) if times else None
    return summary


def series_label(row: dict[str, Any]) -> str:
    """The curve a run belongs to: its objective, plus any grid value other than the sparsity
    coefficient and the seed (e.g. ``local (training_tokens=409600)``)."""
    others = [
        f"{short_key(key)}={row[key]}"
        for key in grid_keys([row])
        if key not in ("loss", "sae.l1_coefficient", SEED_KEY)
    ]
    loss = str(row.get("loss", "run"))
    return f"{loss} ({', '.join(others)})" if others else loss


def short_key(key: str) -> str:
    """The last part of a dotted field name (``sae.l1_coefficient`` → ``l1_coefficient``)."""
    return key.split(".")[-1]
