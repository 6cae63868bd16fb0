"""What a run reports about each step: ``training_log.jsonl`` rows and the progress bar's line.

One JSON line per step (step, tokens seen, phase, the total loss, each loss term by name, the
batch's L0 and ``seconds``, the wall time since the previous row) is appended to ``<output_path>/training_log.jsonl``; a resumed run first drops the rows
of the steps it will redo.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepOutput

from sae_e2e_plugin.run_files import atomic_write_text, disk_full, is_disk_full
from sae_e2e_plugin.training.loop.checkpoints import ResumeError

logger = logging.getLogger(__name__)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one step's row to the log at ``path``: the whole row or nothing.

    A write that fails part-way (a full disk) is cut back to where the row began, so the log
    never ends in half a row; the error names the file. The log is opened without following a
    link, so it is never appended to a file elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(row) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(
                f"{path} is a link; the training log is not written through it. Remove it."
            ) from None
        if is_disk_full(error):
            raise disk_full(path, len(data)) from error
        raise
    try:
        start = os.fstat(descriptor).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(descriptor, data[written:])
        except OSError as error:
            os.ftruncate(descriptor, start)  # no half row left behind
            if is_disk_full(error):
                raise disk_full(path, len(data)) from error
            raise
    finally:
        os.close(descriptor)


def truncate_after(path: Path | None, last_step: int) -> None:
    """Drop the rows of steps after ``last_step`` (a resumed run redoes them).

    A damaged last row (half written when the disk filled or the machine stopped) is dropped
    with a warning; a damaged row before it is refused naming the file and the line."""
    if path is None or not path.exists():
        return
    lines = [line for line in path.read_bytes().decode("utf-8", "replace").splitlines()]
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if any(rest.strip() for rest in lines[number:]):
                raise ResumeError(
                    f"{path}, line {number}, is not a training-log row ({line[:60]!r}); the log "
                    "was changed by hand or damaged. Remove that line (or the file) and resume."
                ) from None
            logger.warning(f"{path}: dropped its damaged last row (line {number}): {line[:60]!r}")
            continue
        if step <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


@torch.no_grad()
def logged_terms(output: TrainStepOutput) -> dict[str, float]:
    """The step's total loss (``total_loss``) and each term as floats, read in one transfer
    (on a GPU each separate read would wait for the device)."""
    names = ["total_loss", *output.losses]
    terms = [output.loss, *output.losses.values()]
    values = torch.stack([t.detach().float().to(output.loss.device) for t in terms]).tolist()
    return dict(zip(names, values, strict=True))


@torch.no_grad()
def batch_l0(output: TrainStepOutput) -> float:
    """Mean number of active features per token in the step's batch."""
    return float((output.feature_acts > 0).float().sum(-1).mean())


def progress_summary(output: TrainStepOutput) -> str:
    """The progress bar's loss terms, the per-hook downstream terms summed into one."""
    shown: dict[str, float] = {"total_loss": float(output.loss.detach())}
    downstream = 0.0
    for name, value in output.losses.items():
        if name.startswith("downstream_mse_loss/"):
            downstream += float(value.detach())
        else:
            shown[name] = float(value.detach())
    if any(name.startswith("downstream_mse_loss/") for name in output.losses):
        shown["downstream_loss"] = downstream
    return " | ".join(f"{name}: {value:.4f}" for name, value in shown.items())
