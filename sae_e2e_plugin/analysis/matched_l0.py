"""What "at matched L0" means in docs/results.md: a family of runs read off at another run's L0.

Runs of one objective at several sparsity coefficients trace a curve of CE-loss increase against
L0. Between two neighbouring runs the curve is taken as straight in log L0 (L0 spans orders of
magnitude and the sweeps space their coefficients geometrically). Beyond the runs only a step of
``MATCH_TOLERANCE`` is allowed, where the end run's value stands (runs at nearly the same L0 are
matched; a comparison that would need a real extrapolation has no number).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

MATCH_TOLERANCE = 0.05
"""How far (relative L0) beyond a family's sparsest or densest run it still counts as matched."""

Point = tuple[float, float]
"""(L0, CE-loss increase) of one finished run."""


def ce_increase_at(points: Sequence[Point], l0: float) -> float | None:
    """The CE-loss increase of the curve through ``points`` at ``l0``; None beyond their L0s
    (by more than ``MATCH_TOLERANCE``)."""
    ordered = sorted(points)
    for (l0_a, ce_a), (l0_b, ce_b) in pairwise(ordered):
        if l0_a <= l0 <= l0_b:
            if l0_a == l0_b:
                return (ce_a + ce_b) / 2
            t = (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
            return ce_a + t * (ce_b - ce_a)
    if not ordered:
        return None
    (low, ce_low), (high, ce_high) = ordered[0], ordered[-1]
    if low / (1 + MATCH_TOLERANCE) <= l0 <= low:
        return ce_low
    if high <= l0 <= high * (1 + MATCH_TOLERANCE):
        return ce_high
    return None


def gap_closed(run: Point, local: Sequence[Point], e2e: Sequence[Point]) -> float | None:
    """How much of the CE-loss gap between local and full e2e training ``run`` closes at its L0.

    1 means as good as full e2e, 0 no better than local (negative: worse; above 1: better than
    full e2e). None when either curve does not reach the run's L0, or they meet there.
    """
    l0, ce = run
    ce_local, ce_e2e = ce_increase_at(local, l0), ce_increase_at(e2e, l0)
    if ce_local is None or ce_e2e is None or ce_local == ce_e2e:
        return None
    return (ce_local - ce) / (ce_local - ce_e2e)
