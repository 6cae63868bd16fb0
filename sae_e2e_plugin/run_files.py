"""The files a run writes into its folders, named in one place, and how they are written.

``output_path`` holds the exported SAE (SAELens' ``cfg.json`` + ``sae_weights.safetensors``),
``EVAL_FILENAME`` and ``TRAINING_LOG_FILENAME``; each checkpoint folder holds SAELens'
trainer state plus ``TRAINER_STATE_FILENAME``. Training writes these files; analysis and
sweeps read them, so both sides take the names from here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

EVAL_FILENAME = "eval.json"
"""The final evaluation on held-out tokens (``EvalResult.to_dict()``); marks a finished run."""

TRAINING_LOG_FILENAME = "training_log.jsonl"
"""One JSON line per training step: step, tokens, phase, each loss term, the batch's L0 and the
step's wall time in ``seconds``."""

TRAINER_STATE_FILENAME = "e2e_trainer_state.json"
"""In a checkpoint: the token-stream position and step count that resume needs."""

CHECKPOINT_COMPLETE_FILENAME = "checkpoint_complete.json"
"""In a checkpoint: written last, so a folder without it is a checkpoint whose writing never
finished (see ``training.loop.checkpoints``)."""

GEOMETRY_FILENAME = "geometry.json"
"""Written by a sweep's results next to a finished run's weights: its dictionary's geometry
(``analysis.geometry.within_summary``) and ``weights_sha256``, the weights it describes, so the
numbers outlive weights that are not kept and are redone for weights that changed."""

CHECKPOINTS_DIRNAME = "checkpoints"
"""The default ``checkpoint_path`` is this folder inside ``output_path``."""

RUN_OUTPUT_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    "sparsity.safetensors",
    "runner_cfg.json",
    EVAL_FILENAME,
    TRAINING_LOG_FILENAME,
)
"""The files a run writes into ``output_path``: their presence marks a folder as a run's."""


class DiskFullError(RuntimeError):
    """A file could not be written for lack of space (or quota); the message names the file."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an ``OSError``, or a library's error wrapping one) says the disk or
    the quota is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "os error 28" in text or "Disk quota" in text


def disk_full(path: Path, needed: int | None = None) -> DiskFullError:
    """The one-line error for ``path`` not written on a full disk."""
    size = f"; {needed} bytes were to be written" if needed is not None else ""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        space = f", {free} bytes free{size}"
    except OSError:
        space = size
    return DiskFullError(
        f"no space left on the device to write {path}{space}. Free some space, then resume."
    )


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling renamed into place: a reader (or a
    run killed mid-write) sees the old file or the new one, never half of one."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """``atomic_write_text`` for bytes (e.g. a rendered PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full(path, len(data)) from error
        raise
    return path
