"""``sae-e2e sweep``: a grid of training runs, each trained and evaluated, resumable.

A sweep file holds ``base`` (config fields, as for ``sae-e2e train --config``), ``grid``
(dotted field names → lists of values, e.g. ``loss: [local, e2e]`` and
``sae.l1_coefficient: [1e-4, 3e-4]``; or a list of such mappings, whose products are joined —
objectives need different sparsity coefficients for similar L0) and optionally ``output_dir``. Every combination is one
run in ``<output_dir>/runs/<run id>/``: its exported SAE and ``eval.json``. A run with an
``eval.json`` is finished and never redone; an interrupted run resumes from its last
checkpoint. ``results.csv`` / ``results.json`` gather one row per finished run, and the
plots are redrawn from them (``sae_e2e_plugin.plots``).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sae_e2e_plugin.runner import EVAL_FILENAME
from sae_e2e_plugin.trainer import TRAINING_LOG_FILENAME

RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Metrics copied from eval.json into the results table.
RESULT_METRICS = (
    "l0", "alive_features", "alive_fraction", "ce_loss_clean", "ce_loss_spliced",
    "ce_loss_increase", "ce_loss_score", "kl_orig_patched", "kl_score", "explained_variance",
    "n_tokens",
)


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid."""

    run_id: str
    """Folder name under ``runs/``, made from the grid values."""
    overrides: dict[str, Any]
    """Dotted field name → value for this run."""


def load_sweep_file(path: Path) -> dict[str, Any]:
    """Read a sweep file and check its shape."""
    if not path.exists():
        raise ValueError(f"sweep file {path} does not exist.")
    spec = yaml.safe_load(path.read_text())
    grids = spec.get("grid") if isinstance(spec, dict) else None
    grids = [grids] if isinstance(grids, dict) else grids
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) and g for g in grids):
        raise ValueError(
            f"{path}: a sweep file needs a non-empty 'grid' mapping, or a list of them "
            "(and usually 'base')."
        )
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid.{key} must be a non-empty list, got {values!r}.")
    return spec


def expand_grid(grid: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> list[SweepRun]:
    """Every combination of the grid's values (of each grid, for a list), in a fixed order."""
    runs: list[SweepRun] = []
    for part in [grid] if isinstance(grid, dict) else grid:
        keys = list(part)
        for values in itertools.product(*(part[k] for k in keys)):
            overrides = dict(zip(keys, values))
            run_id = "__".join(f"{_short(k)}={_slug(v)}" for k, v in overrides.items())
            if run_id not in {r.run_id for r in runs}:
                runs.append(SweepRun(run_id=run_id, overrides=overrides))
    return runs


def run_sweep(
    spec: dict[str, Any],
    output_dir: Path,
    *,
    make_runner: Callable[[Any], Any] | None = None,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate every unfinished run of the grid; return the results table.

    ``make_runner(cfg)`` builds the runner (default ``E2ESAETrainingRunner(cfg)`` with the
    bundled model loaded once and shared between runs).
    """
    from sae_e2e_plugin.cli import config_from_fields

    make_runner = make_runner or _default_runner_factory()
    runs = expand_grid(spec["grid"])
    for index, run in enumerate(runs, start=1):
        run_dir = output_dir / "runs" / run.run_id
        if (run_dir / EVAL_FILENAME).exists():
            print(f"[{index}/{len(runs)}] {run.run_id}: finished earlier, kept")
            continue
        print(f"[{index}/{len(runs)}] {run.run_id}: training")
        cfg = config_from_fields(_run_fields(spec.get("base") or {}, run, run_dir))
        make_runner(cfg).run()
    rows = collect_results(output_dir, runs)
    if plots and rows:
        from sae_e2e_plugin.plots import plot_sweep

        plot_sweep(output_dir, rows)
    return rows


def collect_results(output_dir: Path, runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per finished run (grid values + metrics); written as CSV and JSON."""
    rows = []
    for run in runs:
        eval_file = output_dir / "runs" / run.run_id / EVAL_FILENAME
        if not eval_file.exists():
            continue
        metrics = json.loads(eval_file.read_text())
        row: dict[str, Any] = {"run_id": run.run_id, **run.overrides}
        row.update({name: metrics.get(name) for name in RESULT_METRICS})
        row.update(training_l0_summary(output_dir / "runs" / run.run_id / TRAINING_LOG_FILENAME))
        rows.append(row)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_JSON).write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        with open(output_dir / RESULTS_CSV, "w", newline="") as handle:
            # Grids of a list may set different fields: every column, blank where unset.
            writer = csv.DictWriter(handle, fieldnames=_all_keys(rows), restval="")
            writer.writeheader()
            writer.writerows(rows)
        (output_dir / RESULTS_MD).write_text(results_markdown(rows))
    return rows


# (column title, results key, format) of the markdown table.
_TABLE_COLUMNS = (
    ("L0", "l0", "{:.1f}"),
    ("alive", "alive_features", "{:.0f}"),
    ("CE increase", "ce_loss_increase", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    ("KL", "kl_orig_patched", "{:.3f}"),
    ("expl. var.", "explained_variance", "{:.3f}"),
    ("L0 drift, last tenth", "l0_train_drift", "{:+.1%}"),
)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table: grid values, then metrics; by objective, then L0."""
    grid_keys = [k for k in _all_keys(rows) if k != "run_id" and k not in RESULT_METRICS
                 and not k.startswith("l0_train_")]
    titles = [_short(k) for k in grid_keys] + [title for title, _, _ in _TABLE_COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    ordered = sorted(rows, key=lambda r: (str(r.get("loss")), -(r.get("l0") or 0.0)))
    for row in ordered:
        cells = [str(row[k]) if k in row else "–" for k in grid_keys]
        for _, key, fmt in _TABLE_COLUMNS:
            value = row.get(key)
            cells.append("–" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _all_keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``training_log.jsonl`` (empty if it has none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_l0_summary(path: Path) -> dict[str, float | None]:
    """Whether L0 had settled by the end of training, from the run's training log.

    ``l0_train_end``: the mean batch L0 over the last tenth of the steps;
    ``l0_train_drift``: its relative change from the tenth before (0 = flat;
    -0.1 = still falling by 10% per tenth of the run).
    """
    l0 = [row["l0"] for row in read_training_log(path) if "l0" in row]
    tenth = len(l0) // 10
    if tenth == 0:
        return {"l0_train_end": None, "l0_train_drift": None}
    last = sum(l0[-tenth:]) / tenth
    before = sum(l0[-2 * tenth : -tenth]) / tenth
    return {"l0_train_end": last, "l0_train_drift": (last - before) / before if before else None}


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most tokens under ``run_dir/checkpoints``, if any."""
    from sae_e2e_plugin.trainer import E2E_TRAINER_STATE_FILENAME

    found = [p.parent for p in (run_dir / "checkpoints").glob(f"*/*/{E2E_TRAINER_STATE_FILENAME}")]
    found = [p for p in found if p.name.isdigit()]
    return max(found, key=lambda p: int(p.name)) if found else None


def _run_fields(base: dict[str, Any], run: SweepRun, run_dir: Path) -> dict[str, Any]:
    from sae_e2e_plugin.cli import merge_flags

    fields = merge_flags(base, _nest(run.overrides))
    fields["output_path"] = str(run_dir)
    fields["checkpoint_path"] = str(run_dir / "checkpoints")
    fields["eval_at_end"] = True  # eval.json marks a run as finished
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        print(f"  resuming from {checkpoint}")
        fields["resume_from_checkpoint"] = str(checkpoint)
        # Keep writing into the same run-id folder (SAELens appends wandb_id or a fresh id).
        fields.setdefault("logger", {})["wandb_id"] = checkpoint.parent.name
    return fields


def _default_runner_factory() -> Callable[[Any], Any]:
    from sae_e2e_plugin import builtin
    from sae_e2e_plugin.runner import E2ESAETrainingRunner

    models: dict[str, Any] = {}

    def make(cfg: Any) -> Any:
        model = None
        if builtin.is_builtin_model(cfg.model_name):
            if cfg.model_name not in models:
                models[cfg.model_name] = builtin.load_builtin_model(cfg.model_name, device=cfg.llm_device)
            model = models[cfg.model_name]
        return E2ESAETrainingRunner(cfg, override_model=model)

    return make


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        target = nested
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return nested


def _short(key: str) -> str:
    return key.split(".")[-1]


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "none"
