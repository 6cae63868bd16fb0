"""What a run reports about each step: ``training_log.jsonl`` rows and the progress bar's line.

One JSON line per step (step, tokens seen, phase, the total loss, each loss term by name, the
batch's L0 and ``seconds``, the wall time since the previous row) is appended to ``<output_path>/training_log.jsonl``; a resumed run first drops the rows
of the steps it will redo.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepOutput

from sae_e2e_plugin.run_files import atomic_write_text


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one step's row to the log at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_after(path: Path | None, last_step: int) -> None:
    """Drop the rows of steps after ``last_step`` (a resumed run redoes them)."""
    if path is None or not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["step"] <= last_step]
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
