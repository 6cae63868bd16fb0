"""The phase-timing seam: the trainer and the objectives name each part of a step.

A training step calls ``timer.phase(name)`` around each of its parts (the names are
``PHASES``); the default timer does nothing. A benchmark passes its own ``PhaseTimer``
(``runner.timer = ...`` before ``run()`` or ``build_trainer()``) to see where a step's time goes, without patching the
package. A timer that measures GPU work must synchronise the device itself.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

PHASES = (
    "shared prefix",
    "clean continuation",
    "SAE training forward",
    "patched continuation",
    "KL",
    "backward",
    "optimizer step",
)
"""The phases of one training step, in the order they run. An objective without a patched
run (``"local"``) has no "patched continuation" or "KL" phase."""


class PhaseTimer(Protocol):
    """Anything with a ``phase(name)`` context manager."""

    def phase(self, name: str) -> AbstractContextManager[object]:
        """Time the block run inside ``with timer.phase(name):``."""
        ...


class NoTiming:
    """The default ``PhaseTimer``: every phase is a no-op context."""

    def phase(self, name: str) -> AbstractContextManager[object]:
        return nullcontext()


NO_TIMING = NoTiming()
