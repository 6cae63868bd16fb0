"""``sae-e2e sweep``: a grid of training runs, each trained and evaluated, resumable.

A sweep file holds ``base`` (config fields, as for ``sae-e2e train --config``), ``grid``
(dotted field names → lists of values, e.g. ``loss: [local, e2e]`` and
``sae.l1_coefficient: [1e-4, 3e-4]``; or a list of such mappings, whose products are joined —
objectives need different sparsity coefficients for similar L0) and optionally ``output_dir``. Every combination is one
run in ``<output_dir>/runs/<run id>/``: its exported SAE and ``eval.json``. A run with an
``eval.json`` is finished and never redone; an interrupted run resumes from its last
checkpoint. ``results.csv`` / ``results.json`` gather one row per finished run
(``analysis.results``), and the plots are redrawn from them (``analysis.plots``).

Several processes may work on one sweep (one per GPU, or per machine on a shared file system):
each claims a run's folder before training it (``CLAIM_FILENAME``, an flock the kernel drops
when the process ends) and passes over runs another process holds. ``sweep.yaml`` records the
sweep's ``base``; a start with another ``base`` is refused, so no folder mixes runs trained
with different settings (the grid may grow or be reordered).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sae_lens.constants import SAE_WEIGHTS_FILENAME

from sae_e2e_plugin.analysis.plots import plot_sweep
from sae_e2e_plugin.analysis.results import run_row, short_key, with_gap_closed, write_results
from sae_e2e_plugin.analysis.seeds import seed_sections
from sae_e2e_plugin.assets.language_model import load_language_model
from sae_e2e_plugin.assets.model import is_builtin_model
from sae_e2e_plugin.config_files import load_yaml_file, load_yaml_text
from sae_e2e_plugin.run_files import CHECKPOINTS_DIRNAME, EVAL_FILENAME, atomic_write_text
from sae_e2e_plugin.runs.multi_runner import E2EMultiSAETrainingRunner
from sae_e2e_plugin.runs.output_folder import FolderInUseError, hold_folder
from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner
from sae_e2e_plugin.training.config.fields import config_from_fields, merge_fields, nest_dotted
from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig
from sae_e2e_plugin.training.loop.checkpoints import complete_checkpoints

logger = logging.getLogger(__name__)

CLAIM_FILENAME = ".sae-e2e-sweep.lock"
"""Held in a run's folder by the sweep process training it (the run holds its own lock too)."""
SWEEP_KEYS = frozenset({"base", "grid", "output_dir"})
"""The keys of a sweep file; any other is refused (a misspelt ``grid`` would run nothing)."""
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
SWEEP_RECORD_FILENAME = "sweep.yaml"
"""The sweep file as last started on ``output_dir``; its ``base`` must not change."""


@dataclass(frozen=True)
class SweepRun:
    """One point of the grid."""

    run_id: str
    """Folder name under ``runs/``, made from the grid values."""
    overrides: dict[str, Any]
    """Dotted field name → value for this run."""


def load_sweep_file(path: Path) -> dict[str, Any]:
    """Read a sweep file and check its shape."""
    spec = load_yaml_file(path, "sweep file")
    unknown = sorted(set(spec) - SWEEP_KEYS) if isinstance(spec, dict) else []
    if unknown:
        raise ValueError(
            f"sweep file {path}: {', '.join(map(repr, unknown))} is not a sweep file key; a "
            f"sweep file holds {', '.join(sorted(SWEEP_KEYS))} (config fields go under base)."
        )
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
            check_grid_key(key, path)
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid.{key} must be a non-empty list, got {values!r}.")
    return spec


def check_grid_key(key: Any, source: Path | str = "the sweep") -> None:
    """Refuse a grid key that is not a dotted field name (``sae.l1_coefficient``): a key is a
    part of a run's folder name, so a path (``/tmp/x``, ``../x``) could place runs outside
    ``output_dir``."""
    if not isinstance(key, str) or not _FIELD_NAME.fullmatch(key):
        raise ValueError(
            f"{source}: grid key {key!r} is not a dotted config field name (e.g. "
            "sae.l1_coefficient); a grid key names a field, never a path."
        )


def expand_grid(grid: dict[str, list[Any]] | list[dict[str, list[Any]]]) -> list[SweepRun]:
    """Every combination of the grid's values (of each grid, for a list), in a fixed order."""
    runs: list[SweepRun] = []
    for part in [grid] if isinstance(grid, dict) else grid:
        keys = list(part)
        for key in keys:  # a spec built in Python is not read by load_sweep_file
            check_grid_key(key)
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
    """Train and evaluate every unfinished run of the grid that no other process holds; return
    the results table (of every finished run, whichever process trained it).

    ``make_runner(cfg)`` builds the runner (default ``E2ESAETrainingRunner(cfg)`` with the
    bundled model loaded once and shared between runs).
    """
    runs = expand_grid(spec["grid"])  # every grid key checked before anything is written
    check_run_configs(spec, output_dir, runs)
    record_sweep(spec, output_dir)
    make_runner = make_runner or _default_runner_factory()
    for index, run in enumerate(runs, start=1):
        run_dir = output_dir / "runs" / run.run_id
        with _claimed(run_dir) as claimed:
            # Checked under the claim: a run another process finished a moment ago is kept.
            if not claimed:
                logger.info(f"[{index}/{len(runs)}] {run.run_id}: held by another process, left")
            elif _finished(
                run_dir, merge_fields(spec.get("base") or {}, nest_dotted(run.overrides))
            ):
                logger.info(f"[{index}/{len(runs)}] {run.run_id}: finished earlier, kept")
            else:
                logger.info(f"[{index}/{len(runs)}] {run.run_id}: training")
                cfg = config_from_fields(_run_fields(spec.get("base") or {}, run, run_dir))
                try:
                    make_runner(cfg).run()
                except FolderInUseError as error:  # a run started outside the sweep holds it
                    logger.warning(f"[{index}/{len(runs)}] {run.run_id}: left, {error}")
    return _report(output_dir, runs, plots)


def check_run_configs(spec: dict[str, Any], output_dir: Path, runs: list[SweepRun]) -> None:
    """Build every run's config before anything is written: a bad value in ``base`` or the
    grid is refused naming the run, not after earlier runs trained (no model is loaded)."""
    for run in runs:
        fields = merge_fields(spec.get("base") or {}, nest_dotted(run.overrides))
        run_dir = output_dir / "runs" / run.run_id
        fields.update(output_path=str(run_dir), checkpoint_path=str(run_dir / CHECKPOINTS_DIRNAME))
        try:
            config_from_fields(fields)
        except ValueError as error:
            raise ValueError(f"run {run.run_id} of the sweep: {error}") from None


def report_sweep(
    spec: dict[str, Any], output_dir: Path, *, plots: bool = True
) -> list[dict[str, Any]]:
    """The results table and plots of the runs finished so far, as ``run_sweep`` writes them at
    its end; nothing is trained. A long sweep's interim results, while its processes go on."""
    _check_started(spec, output_dir)
    return _report(output_dir, expand_grid(spec["grid"]), plots)


def _check_started(spec: dict[str, Any], output_dir: Path) -> None:
    """Refuse a folder where the sweep was never started, or started with another base."""
    if not (output_dir / "runs").is_dir():
        raise ValueError(
            f"output_dir={str(output_dir)!r} holds no sweep to report on (no runs/ folder): "
            "start it first with `sae-e2e sweep --config <file>`, or pass --output with the "
            "folder it writes to."
        )
    check_base(spec, output_dir)  # a sweep older than sweep.yaml has nothing to check against


def reevaluate_sweep(
    spec: dict[str, Any],
    output_dir: Path,
    *,
    make_runner: Callable[[Any], Any] | None = None,
    plots: bool = True,
) -> list[dict[str, Any]]:
    """Evaluate every finished run's exported SAE again, with this version's evaluation on the
    same held-out tokens, and rewrite its ``eval.json``; then report as ``report_sweep``.
    Nothing is trained. For a sweep whose evaluation changed after some runs finished, so its
    table does not mix two definitions of a metric. Runs without their weights, and runs
    another process holds, are left as they are (and logged)."""
    _check_started(spec, output_dir)  # before loading a model
    make_runner = make_runner or _default_runner_factory()
    for run in expand_grid(spec["grid"]):
        run_dir = output_dir / "runs" / run.run_id
        fields = merge_fields(spec.get("base") or {}, nest_dotted(run.overrides))
        if not _finished(run_dir, fields):
            continue
        # A run of several SAEs holds one export per SAE, in <run>/<name>/.
        folders = [run_dir / name for name in fields.get("saes") or {}] or [run_dir]
        with _claimed(run_dir) as claimed:
            if not claimed or not all((f / SAE_WEIGHTS_FILENAME).exists() for f in folders):
                why = "held by another process" if not claimed else "its SAE weights are not kept"
                logger.warning(f"{run.run_id}: not evaluated again, {why}")
                continue
            # overwrite_output only lets the runner be built on a finished run's folder: it
            # clears the folder when training starts, and nothing is trained here.
            fields.update(output_path=str(run_dir), overwrite_output=True)
            make_runner(config_from_fields(fields)).evaluate_exports()
            logger.info(f"{run.run_id}: evaluated again")
    return _report(output_dir, expand_grid(spec["grid"]), plots)


def _report(output_dir: Path, runs: list[SweepRun], plots: bool) -> list[dict[str, Any]]:
    rows = collect_results(output_dir, runs)
    if plots and rows:
        plot_sweep(output_dir, rows)
    return rows


def record_sweep(spec: dict[str, Any], output_dir: Path) -> None:
    """Write ``spec`` to ``output_dir/sweep.yaml`` once ``check_base`` passes."""
    check_base(spec, output_dir)
    spec = json.loads(json.dumps(spec, default=str))  # tuples -> lists, paths -> str: as YAML reads
    atomic_write_text(output_dir / SWEEP_RECORD_FILENAME, yaml.safe_dump(spec, sort_keys=False))


def check_base(spec: dict[str, Any], output_dir: Path) -> None:
    """Refuse a ``spec`` whose ``base`` differs from the one recorded in ``output_dir``: its runs
    would sit in one table with runs trained under other settings."""
    record = output_dir / SWEEP_RECORD_FILENAME
    spec = json.loads(json.dumps(spec, default=str))  # compared as YAML would read it back
    if record.exists():
        recorded = load_yaml_text(record.read_text(encoding="utf-8"), str(record)) or {}
        before = _flat(recorded.get("base") or {} if isinstance(recorded, dict) else {})
        now = _flat(spec.get("base") or {})
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
            raise ValueError(
                f"output_dir={str(output_dir)!r} holds a sweep started with another base "
                f"({shown}). Its runs were trained with the old settings: choose another "
                f"output_dir, or restore the base recorded in {record}."
            )


def _flat(fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested fields as dotted name -> value (``sae.d_sae``), for naming what changed."""
    flat: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextmanager
def _claimed(run_dir: Path) -> Iterator[bool]:
    """Hold ``run_dir`` for this sweep process while the block runs; ``False`` when another
    process holds it. Only the claim is guarded: errors from the block itself propagate."""
    for folder in (run_dir.parent, run_dir):  # runs/ and runs/<run id> stay inside output_dir
        if folder.is_symlink():
            raise ValueError(
                f"{folder} is a link (to {folder.readlink()}); a sweep writes its runs only "
                "inside output_dir. Replace the link with a folder."
            )
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_folder(run_dir, "run", lock_name=CLAIM_FILENAME))
        except FolderInUseError:
            yield False
            return
        yield True


def collect_results(output_dir: Path, runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per finished run (grid values + metrics; a run of several SAEs: one row per SAE,
    ``run_id/<name>``, with the SAE's name under ``sae``); written as CSV, JSON and markdown."""
    rows = []
    for run in runs:
        run_dir = output_dir / "runs" / run.run_id
        rows.append(run_row(run_dir, run.run_id, run.overrides))
        for folder in _several_sae_folders(run_dir):
            overrides = run.overrides | {"sae": folder.name}
            rows.append(run_row(folder, f"{run.run_id}/{folder.name}", overrides))
    finished = with_gap_closed([row for row in rows if row is not None])
    write_results(output_dir, finished, seed_sections(finished))
    return finished


def _finished(run_dir: Path, fields: dict[str, Any]) -> bool:
    """Whether the run has its evaluation: ``eval.json`` (a run of several SAEs: in every SAE's
    folder), written last by the runner."""
    names = list(fields.get("saes") or {}) or [""]
    return all((run_dir / name / EVAL_FILENAME).exists() for name in names)


def _several_sae_folders(run_dir: Path) -> list[Path]:
    # A run of several SAEs exports (and evaluates) each into <run>/<name>/.
    if not run_dir.is_dir() or (run_dir / EVAL_FILENAME).exists():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / EVAL_FILENAME).is_file())


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
        if isinstance(cfg, E2EMultiRunnerConfig):
            return E2EMultiSAETrainingRunner(cfg, override_model=model)
        return E2ESAETrainingRunner(cfg, override_model=model)

    return make


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-") or "none"
