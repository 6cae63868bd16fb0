"""Checkpoint folders that are either complete or absent, and finding the one to resume from.

A checkpoint is written into a hidden staging sibling (``.<name>.partial-<id>``); only when
every file is on disk does a completion marker go in and the folder get renamed to its name.
A run killed mid-write leaves a staging folder that no resume ever picks; a write that fails
(e.g. a full disk) removes its staging folder and raises ``CheckpointWriteError``, leaving the
earlier checkpoints as they were. Resume accepts a checkpoint folder, or a folder of them (the
latest complete one is taken and named in the log), and names any missing file.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import (
    ACTIVATION_SCALER_CFG_FILENAME,
    RUNNER_CFG_FILENAME,
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
)
from sae_lens.constants import TRAINER_STATE_FILENAME as SAELENS_TRAINER_STATE_FILENAME

from sae_e2e_plugin.config_files import without_secrets
from sae_e2e_plugin.run_files import CHECKPOINT_COMPLETE_FILENAME, TRAINER_STATE_FILENAME

logger = logging.getLogger(__name__)

REQUIRED_FILES = (
    SAE_CFG_FILENAME,
    SAE_WEIGHTS_FILENAME,
    SAELENS_TRAINER_STATE_FILENAME,
    ACTIVATION_SCALER_CFG_FILENAME,
    TRAINER_STATE_FILENAME,
)
"""What resume reads from a checkpoint folder."""

_STAGING_MARK = ".partial-"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the earlier checkpoints are intact."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed from; the message says which and what to do instead."""


@contextmanager
def staged_checkpoint(base: Path, name: str, marker: dict[str, Any]) -> Iterator[Path]:
    """Yield a staging folder to write checkpoint ``name`` into; publish it as ``base/name``.

    On leaving the block normally, ``marker`` is written as the completion marker and the
    folder is renamed into place (replacing an older folder of that name). On an exception the
    staging folder is removed and ``CheckpointWriteError`` names the folder and the cause.
    """
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".{name}{_STAGING_MARK}{uuid.uuid4().hex[:8]}"
    final = base / name
    try:
        yield staging
        _remove_secrets(staging)
        _write_marker(staging, marker)
        _replace_folder(staging, final)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        earlier = latest_complete_checkpoint(base)
        kept = (
            f"the latest complete checkpoint, {earlier}, is intact"
            if earlier
            else ("no earlier checkpoint exists")
        )
        raise CheckpointWriteError(
            f"could not write the checkpoint {final} ({type(error).__name__}: {error}); {kept}. "
            "Check the free disk space and permissions of checkpoint_path, then resume."
        ) from error
    remove_stale_staging(base)


def _remove_secrets(folder: Path) -> None:
    # SAELens writes the whole run config (and the SAE's metadata, which repeats the model's
    # loading arguments) into each checkpoint: credentials stay out of them.
    for path in [*folder.rglob(RUNNER_CFG_FILENAME), *folder.rglob(SAE_CFG_FILENAME)]:
        saved = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(without_secrets(saved)), encoding="utf-8")


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    # fsync the files first: after a power cut, a marker must not outlive the data it vouches for.
    for path in folder.rglob("*"):
        if path.is_file():
            _fsync(path)
    (folder / CHECKPOINT_COMPLETE_FILENAME).write_text(json.dumps(marker))
    _fsync(folder / CHECKPOINT_COMPLETE_FILENAME)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _replace_folder(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; an older ``final`` is moved aside first, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(base: Path) -> None:
    """Remove the staging folders of checkpoint writes that were killed (SIGKILL, power cut):
    they hold nothing resumable. After each write, and when a run resumes from ``base``."""
    if not base.is_dir():
        return
    for path in base.iterdir():
        if path.name.startswith(".") and (_STAGING_MARK in path.name or ".old-" in path.name):
            shutil.rmtree(path, ignore_errors=True)


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint whose writing finished."""
    return (folder / CHECKPOINT_COMPLETE_FILENAME).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in ``root`` or one level below it (``<checkpoints>/<run id>/<n>``),
    oldest first (by the tokens seen, which name them)."""
    candidates = [p for p in root.glob("*") if p.is_dir()] + [
        p for p in root.glob("*/*") if p.is_dir()
    ]
    found = [p for p in candidates if is_complete_checkpoint(p) and not p.name.startswith(".")]
    return sorted(found, key=_tokens_seen)


def latest_complete_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the most tokens seen under ``root``, if any."""
    found = complete_checkpoints(root) if root.is_dir() else []
    return found[-1] if found else None


def _tokens_seen(folder: Path) -> int:
    try:
        marker = json.loads((folder / CHECKPOINT_COMPLETE_FILENAME).read_text())
        return int(marker["n_training_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(folder.name) if folder.name.isdigit() else -1


def resolve_resume_checkpoint(path: str, several: bool = False) -> Path:
    """The checkpoint folder to resume from, for ``resume_from_checkpoint=path``.

    A complete checkpoint is itself; a folder of checkpoints gives its latest complete one.
    Anything else (missing, incomplete, lacking files) is a ``ResumeError`` saying what to do.
    ``several``: a run of several SAEs, whose SAETrainer files are in one folder per SAE.
    """
    folder = Path(path)
    field = f"resume_from_checkpoint={path!r}"
    required = (TRAINER_STATE_FILENAME,) if several else REQUIRED_FILES
    if not folder.is_dir():
        raise ResumeError(f"{field} does not exist; pass a checkpoint folder of an earlier run.")
    # What killed checkpoint writes left (in the run's folder, or next to the checkpoint).
    remove_stale_staging(folder if not is_complete_checkpoint(folder) else folder.parent)
    if is_complete_checkpoint(folder):
        return _with_required_files(folder, field, required)
    latest = latest_complete_checkpoint(folder)
    if latest is not None:
        logger.info(f"{field} holds checkpoints; resuming from the latest complete one: {latest}")
        return _with_required_files(latest, field, required)
    if any((folder / name).exists() for name in required):
        if not _missing(folder, required):
            # Written before completion markers existed: every file is there, so accept it.
            return folder
        nearest = latest_complete_checkpoint(folder.parent)
        hint = f"resume from {nearest}" if nearest else "no complete checkpoint is next to it"
        raise ResumeError(
            f"{field} is an incomplete checkpoint (its writing never finished; "
            f"{_missing(folder, required)} missing): {hint}."
        )
    raise ResumeError(
        f"{field} is neither a checkpoint nor a folder holding checkpoints; pass a folder "
        "under the run's checkpoint_path (e.g. <output_path>/checkpoints/<run id>/<tokens>)."
    )


def _missing(folder: Path, required: tuple[str, ...]) -> str:
    return ", ".join(name for name in required if not (folder / name).is_file())


def _with_required_files(folder: Path, field: str, required: tuple[str, ...]) -> Path:
    missing = _missing(folder, required)
    if missing:
        raise ResumeError(
            f"{field}: the checkpoint {folder} lacks {missing}; it was damaged after it was "
            "written. Resume from an earlier checkpoint of the run."
        )
    return folder


def refuse_unsafe_trainer_state(
    folder: Path, device: str, optimizer: torch.optim.Optimizer
) -> None:
    """Load SAETrainer's ``trainer_state.pt`` tensors-only, refusing it if it names any code or
    holds Adam settings other than ``optimizer``'s (the one this run's config built).

    SAETrainer loads it with a bare ``torch.load``, which under ``weights_only=False`` (torch
    before 2.6, or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) runs any code a pickle names, and a
    checkpoint folder may come from someone else. A file that loads tensors-only names no code,
    so SAETrainer's load of it afterwards runs none. A file that is merely damaged is left to
    fail there (the runner names it as damaged).
    """
    path = folder / SAELENS_TRAINER_STATE_FILENAME
    if not path.is_file():
        raise ResumeError(
            f"resume_from_checkpoint={str(folder)!r} has no {path.name}: pass a checkpoint "
            "folder written by a training run."
        )
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message also suggests weights_only=False; pass on only what it refused.
        refused = [part.strip() for part in str(error).split("\n\n") if "GLOBAL" in part]
        if not refused:
            raise
        raise ResumeError(
            f"{path} holds objects other than tensors and plain containers, so it is not "
            f"loaded (loading it could run code): {refused[0].rstrip('.')}. Resume only from "
            "checkpoints written by a training run; this file was not, or has been changed."
        ) from error
    # A file of another shape is left to SAETrainer's load, which fails on it (named as damaged).
    saved = state.get("optimizer") if isinstance(state, dict) else None
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if isinstance(groups, list) and len(groups) == len(optimizer.param_groups):
        if all(isinstance(group, dict) for group in groups):
            _refuse_other_adam_settings(path, groups, optimizer.param_groups)


ADAM_SETTINGS = tuple(
    "initial_lr betas eps weight_decay amsgrad maximize foreach capturable differentiable "
    "decoupled_weight_decay".split()
)
"""Adam's settings that a checkpoint's param groups would replace on load. This run's config
decides them (``lr`` follows the LR schedule; the kernel, ``fused``, is set again after load)."""


def _refuse_other_adam_settings(path: Path, saved: list[Any], ours: list[dict[str, Any]]) -> None:
    # Optimizer.load_state_dict takes every setting from the file: a group saying maximize=True
    # or weight_decay=0.1 would train something else without a word.
    changed = [
        f"{key}: {group[key]!r} here, {theirs.get(key)!r} in the checkpoint"
        for theirs, group in zip(saved, ours, strict=True)
        for key in ADAM_SETTINGS
        if key in group and key in theirs and not _same_setting(theirs[key], group[key])
    ]
    if changed:
        raise ResumeError(
            f"{path} holds Adam settings this run's config does not ({'; '.join(changed)}). "
            "Resume only from checkpoints written by a training run of this config; this file "
            "was not, or has been changed."
        )


def _same_setting(saved: Any, ours: Any) -> bool:
    # Numbers by value (weight_decay 0 and 0.0 mean the same); anything else, a tensor included,
    # only when of the same type and equal.
    if isinstance(saved, (int, float)) and isinstance(ours, (int, float)):
        return saved == ours
    if isinstance(saved, (tuple, list)) and isinstance(ours, (tuple, list)):
        return len(saved) == len(ours) and all(map(_same_setting, saved, ours))
    return type(saved) is type(ours) and saved == ours


def read_run_state(
    checkpoint: Path,
    several: tuple[list[str], str] | None,
    objective: str,
    first_e2e_step: int,
) -> dict[str, Any]:
    """The checkpoint's ``e2e_trainer_state.json``, refused unless this run can continue it.

    ``several`` is this run's SAE names and splice mode (None: a single-SAE run); ``objective``
    and ``first_e2e_step`` are its loss and schedule switch: a checkpoint of other SAEs, another
    loss or another schedule (``e2e_fraction``) cannot continue it."""
    field = f"resume_from_checkpoint={str(checkpoint)!r}"
    path = checkpoint / TRAINER_STATE_FILENAME
    if not path.is_file():
        raise ResumeError(
            f"{field} has no {TRAINER_STATE_FILENAME}: it was not written by an e2e run. "
            "Resume from a checkpoint of an e2e run."
        )
    state = json.loads(path.read_text())
    if several is None and "saes" in state:
        raise ResumeError(
            f"{field} holds several SAEs {state['saes']}; resume it with "
            "E2EMultiSAETrainingRunner and its saes."
        )
    if several is not None:
        names, mode = several
        if "saes" not in state:
            raise ResumeError(
                f"{field} is a single-SAE checkpoint; resume it with E2ESAETrainingRunner, or "
                "start this multi-SAE run without resume_from_checkpoint."
            )
        if sorted(state["saes"]) != sorted(names) or state["splice"] != mode:
            raise ResumeError(
                f"{field} holds SAEs {state['saes']} spliced {state['splice']!r}; this run has "
                f"{names} spliced {mode!r}. Resume with the checkpoint's saes and splice."
            )
        missing = [name for name in names if not (checkpoint / name).is_dir()]
        if missing:
            raise ResumeError(f"{field} lacks the folders of SAEs {missing}; it is damaged.")
    # Written as "loss" by 0.1.0 checkpoints.
    saved_objective = state.get("objective", state.get("loss"))
    if saved_objective is not None and saved_objective != objective:
        raise ResumeError(
            f"{field} was written by a run with loss={saved_objective!r}, but this run has "
            f"loss={objective!r}. Resume with loss={saved_objective!r}, or start a new run "
            "without resume_from_checkpoint."
        )
    # Written without it before e2e_fraction existed: every step was end to end.
    saved_switch = int(state.get("first_e2e_step", 0))
    if saved_switch != first_e2e_step:
        raise ResumeError(
            f"{field} was written by a run whose first end-to-end step was {saved_switch}, but "
            f"this run's (its e2e_fraction and training_tokens) is {first_e2e_step}. Resume "
            "with the checkpoint's e2e_fraction and training_tokens."
        )
    return state
