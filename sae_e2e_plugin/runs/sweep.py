"""``sae-e2e sweep``: a grid of training runs, each trained and evaluated, resumable.

A sweep file holds ``base`` (config fields, as for ``sae-e2e train --config``), ``grid``
(dotted field names → lists of values, e.g. ``loss: [local, e2e]`` and
``sae.l1_coefficient: [1e-4, 3e-4]``; or a list of such mappings, whose products are joined —
objectives need different sparsity coefficients for similar L0) and optionally ``output_dir``. Every combination is one
run in ``<output_dir>/runs/<run id>/``: its exported SAE and ``eval.json``. A run with an
``eval.json`` is finished and never redone; an interrupted run resumes from its last
checkpoint. ``results.csv`` / ``results.json`` gather one row per finished run
(``analysis.results``), and the plots are redrawn from them (``analysis.plots``).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sae_e2e_plugin.analysis.plots import plot_sweep
from sae_e2e_plugin.analysis.results import run_row, short_key, with_gap_closed, write_results
from sae_e2e_plugin.analysis.seeds import seed_sections
from sae_e2e_plugin.assets.language_model import load_language_model
from sae_e2e_plugin.assets.model import is_builtin_model
from sae_e2e_plugin.run_files import CHECKPOINTS_DIRNAME, EVAL_FILENAME
from sae_e2e_plugin.runs.output_folder import hold_folder
from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner
from sae_e2e_plugin.training.checkpoints import complete_checkpoints
from sae_e2e_plugin.training.fields import config_from_fields, merge_fields, nest_dotted

logger = logging.getLogger(__name__)


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
    if (
        not isinstance(grids, list)
        or not grids
        or not all(isinstance(g, dict) and g for g in grids)
    ):
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
            overrides = dict(zip(keys, values, strict=True))
            run_id = "__".join(f"{short_key(k)}={_slug(v)}" for k, v in overrides.items())
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
    with hold_folder(output_dir, "output_dir"):  # a second sweep on it would share run folders
        return _run_grid(spec, output_dir, make_runner or _default_runner_factory(), plots)


def _run_grid(
    spec: dict[str, Any], output_dir: Path, make_runner: Callable[[Any], Any], plots: bool
) -> list[dict[str, Any]]:
    runs = expand_grid(spec["grid"])
    for index, run in enumerate(runs, start=1):
        run_dir = output_dir / "runs" / run.run_id
        if (run_dir / EVAL_FILENAME).exists():
            logger.info(f"[{index}/{len(runs)}] {run.run_id}: finished earlier, kept")
            continue
        logger.info(f"[{index}/{len(runs)}] {run.run_id}: training")
        cfg = config_from_fields(_run_fields(spec.get("base") or {}, run, run_dir))
        make_runner(cfg).run()
    rows = collect_results(output_dir, runs)
    if plots and rows:
        plot_sweep(output_dir, rows)
    return rows


def collect_results(output_dir: Path, runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per finished run (grid values + metrics); written as CSV, JSON and markdown."""
    rows = [run_row(output_dir / "runs" / run.run_id, run.run_id, run.overrides) for run in runs]
    finished = with_gap_closed([row for row in rows if row is not None])
    write_results(output_dir, finished, seed_sections(finished))
    return finished


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most tokens under ``run_dir/checkpoints``, if any
    (``final_*`` checkpoints are of finished runs, whose eval.json says so)."""
    found = [p for p in complete_checkpoints(run_dir / CHECKPOINTS_DIRNAME) if p.name.isdigit()]
    return found[-1] if found else None


def _run_fields(base: dict[str, Any], run: SweepRun, run_dir: Path) -> dict[str, Any]:
    fields = merge_fields(base, nest_dotted(run.overrides))
    fields["output_path"] = str(run_dir)
    fields["checkpoint_path"] = str(run_dir / CHECKPOINTS_DIRNAME)
    fields["eval_at_end"] = True  # eval.json marks a run as finished
    # The sweep owns the run's folder: what a run killed before its first checkpoint left there
    # (a training log) is replaced.
    fields["overwrite_output"] = True
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        logger.info(f"  resuming from {checkpoint}")
        fields["resume_from_checkpoint"] = str(checkpoint)
        # Keep writing into the same run-id folder (SAELens appends wandb_id or a fresh id).
        fields.setdefault("logger", {})["wandb_id"] = checkpoint.parent.name
    return fields


def _default_runner_factory() -> Callable[[Any], Any]:
    models: dict[str, Any] = {}

    def make(cfg: Any) -> Any:
        # Built-in models load once and are shared by every run of the sweep.
        model = None
        if is_builtin_model(cfg.model_name):
            key = f"{cfg.model_name}/{cfg.model_class_name}"
            if key not in models:
                models[key] = load_language_model(
                    cfg.model_name,
                    model_class_name=cfg.model_class_name,
                    device=cfg.llm_device,
                )
            model = models[key]
        return E2ESAETrainingRunner(cfg, override_model=model)

    return make


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "none"
