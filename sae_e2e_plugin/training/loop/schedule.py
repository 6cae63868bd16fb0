"""The run's phase schedule: local steps first, then end-to-end steps (``e2e_fraction``).

A run of ``training_tokens / train_batch_size_tokens`` steps trains its last
``e2e_steps = round(e2e_fraction × steps)`` steps with the configured e2e objective and every
step before them with SAELens' local objective on activations from the ``ActivationsStore``
buffer. Steps are numbered from 0 (SAETrainer's ``n_training_steps`` before the step is taken),
so step ``first_e2e_step = steps − e2e_steps`` is the first e2e step; with ``e2e_fraction=1``
it is step 0 and no local step exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Phase = Literal["local", "e2e"]


@dataclass(frozen=True)
class PhaseSchedule:
    """Which steps train locally and which end to end; fixed when the run is built."""

    total_steps: int
    """Steps in the whole run (``training_tokens // train_batch_size_tokens``)."""
    first_e2e_step: int
    """Index (from 0) of the first e2e step; every earlier step is local."""
    tokens_per_step: int
    """``train_batch_size_tokens``: tokens (local: activations) consumed by one step."""

    @property
    def local_steps(self) -> int:
        return self.first_e2e_step

    @property
    def e2e_steps(self) -> int:
        return self.total_steps - self.first_e2e_step

    @property
    def local_tokens(self) -> int:
        return self.local_steps * self.tokens_per_step

    @property
    def e2e_tokens(self) -> int:
        return self.e2e_steps * self.tokens_per_step

    def phase(self, step: int) -> Phase:
        """The phase of step ``step`` (counted from 0)."""
        return "local" if step < self.first_e2e_step else "e2e"

    def describe(self, loss: str) -> str:
        """One line for the log: steps and tokens of each phase (``loss``: the run's objective)."""
        # With loss="local" the "e2e" phase is the local objective spliced in, not end to end.
        if self.local_steps == 0:
            return f"all {self.total_steps} steps with loss={loss!r} ({self.e2e_tokens} tokens)"
        return (
            f"steps 0-{self.first_e2e_step - 1} local ({self.local_tokens} activations from the "
            f"activation buffer), steps {self.first_e2e_step}-{self.total_steps - 1} with "
            f"loss={loss!r} ({self.e2e_tokens} tokens)"
        )


def e2e_step_count(total_steps: int, e2e_fraction: float) -> int:
    """``e2e_fraction × total_steps`` rounded to the nearest whole step (halves round up)."""
    # The small tolerance keeps e.g. 0.1 × 50 = 5.000000000000001 from becoming anything but 5.
    return min(total_steps, math.floor(e2e_fraction * total_steps + 0.5 + 1e-9))


def plan_schedule(
    training_tokens: int, train_batch_size_tokens: int, e2e_fraction: float
) -> PhaseSchedule:
    """The schedule of a run (its numbers are checked by ``training.config.numbers`` beforehand)."""
    total = training_tokens // train_batch_size_tokens
    return PhaseSchedule(
        total_steps=total,
        first_e2e_step=total - e2e_step_count(total, e2e_fraction),
        tokens_per_step=train_batch_size_tokens,
    )


class LocalData(Protocol):
    """The local phase's data: activation batches ``[rows, d_in]`` (several SAEs:
    ``{hook: [rows, d_in]}``, every hook's rows from the same tokens)."""

    def __next__(self) -> Any: ...

    def state(self) -> dict[str, Any]:
        """Its position, saved in checkpoints (JSON-serialisable)."""
        ...
