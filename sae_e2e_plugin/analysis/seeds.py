"""Runs repeated with other seeds, and the objectives compared at matched L0.

A sweep repeats a grid point with other seeds by adding ``seed`` to its grid: rows that differ
only in ``seed`` (a row without it ran with the base config's seed) are one grid point. The
seeds' mean is the point on the curve; their spread is how far apart runs that should agree
land. ``matched_l0_rows`` reads every curve of seed means at the L0 of each local point;
``reference_at_runs_rows`` reads local's curve at the L0 of each other point, with the ratio's
spread over that point's seeds: the comparison behind docs/results.md's headline.
"""

from __future__ import annotations

import statistics
from typing import Any

from sae_e2e_plugin.analysis.matched_l0 import ce_increase_at
from sae_e2e_plugin.analysis.results import SEED_KEY, grid_keys, series_label

SPREAD_METRICS = ("l0", "ce_loss_increase", "kl_orig_patched", "alive_features")
"""Metrics given with their spread over seeds."""


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per grid point, in first-seen order: its grid values (``seed`` left out),
    ``n_seeds``, the mean of each of ``SPREAD_METRICS`` under the metric's name, and
    ``spread[metric] = (sample standard deviation or None for one seed, min, max)``."""
    points = []
    for members in _seed_groups(rows):
        point: dict[str, Any] = {key: members[0][key] for key, _ in _grid_point(members[0])}
        point["n_seeds"] = len(members)
        point["spread"] = {}
        for metric in SPREAD_METRICS:
            values = [float(row[metric]) for row in members]
            point[metric] = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else None
            point["spread"][metric] = (sd, min(values), max(values))
        points.append(point)
    return points


def seeds_markdown(points: list[dict[str, Any]]) -> str:
    """The grid points run with more than one seed: mean ± standard deviation (min–max)."""
    repeated = [point for point in points if point["n_seeds"] > 1]
    if not repeated:
        return ""
    keys = grid_keys(repeated)
    titles = [key.split(".")[-1] for key in keys] + ["seeds"] + [t for t, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for point in sorted(repeated, key=lambda p: (str(p.get("loss")), -p["l0"])):
        cells = [str(point.get(key, "–")) for key in keys] + [str(point["n_seeds"])]
        for _, metric, fmt in _COLUMNS:
            sd, low, high = (fmt.format(value) for value in point["spread"][metric])
            cells.append(f"{fmt.format(point[metric])} ± {sd} ({low}–{high})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def matched_l0_rows(points: list[dict[str, Any]], reference: str = "local") -> list[dict[str, Any]]:
    """At the L0 of each point of the ``reference`` curve, every other curve's CE-loss increase
    (``analysis.matched_l0``: None where that curve does not reach the L0) and the reference's
    CE-loss increase divided by it. Curves are ``series_label``s of seed means."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for point in points:
        curves.setdefault(series_label(point), []).append((point["l0"], point["ce_loss_increase"]))
    rows = []
    for l0, ce_reference in sorted(curves.get(reference, [])):
        row: dict[str, Any] = {"L0": l0, reference: ce_reference}
        for label in sorted(set(curves) - {reference}):
            ce = ce_increase_at(curves[label], l0)
            row[label] = ce
            row[f"{reference} / {label}"] = ce_reference / ce if ce else None
        rows.append(row)
    return rows


def matched_l0_markdown(rows: list[dict[str, Any]]) -> str:
    """``matched_l0_rows`` as a table (CE-loss increases, then ratios); empty with one curve."""
    if not rows or len(rows[0]) <= 2:
        return ""
    titles = list(rows[0])
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        cells = [f"{row['L0']:.1f}"]
        for key in titles[1:]:
            fmt = "{:.2f}×" if " / " in key else "{:.3f}"
            cells.append("–" if row[key] is None else fmt.format(row[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reference_at_runs_rows(
    rows: list[dict[str, Any]], reference: str = "local"
) -> list[dict[str, Any]]:
    """The other direction of ``matched_l0_rows``: for each grid point off the ``reference``
    curve, its seeds' mean L0 and CE-loss increase, the reference curve (of seed means) read at
    that L0, and ``reference / run``, their ratio. ``ratio_range`` is the ratio's (min, max) over
    the point's seeds, each read at its own L0 (None for one seed, or where a seed's L0 is off
    the reference curve)."""
    curve = [
        (point["l0"], point["ce_loss_increase"])
        for point in seed_means(rows)
        if series_label(point) == reference
    ]
    out = []
    for members in _seed_groups(rows):
        label = series_label(members[0])
        if label == reference:
            continue
        l0 = statistics.fmean(row["l0"] for row in members)
        ce = statistics.fmean(row["ce_loss_increase"] for row in members)
        at_l0 = ce_increase_at(curve, l0)
        each = [
            _ratio(ce_increase_at(curve, row["l0"]), row["ce_loss_increase"]) for row in members
        ]
        ratios = [ratio for ratio in each if ratio is not None]
        spread = len(members) > 1 and len(ratios) == len(members)
        out.append(
            {
                "curve": label,
                "l1_coefficient": members[0].get("sae.l1_coefficient"),
                "n_seeds": len(members),
                "l0": l0,
                "ce_loss_increase": ce,
                reference: at_l0,
                "ratio": _ratio(at_l0, ce),
                "ratio_range": (min(ratios), max(ratios)) if spread else None,
            }
        )
    return sorted(out, key=lambda row: (row["curve"], -row["l0"]))


def reference_at_runs_markdown(rows: list[dict[str, Any]], reference: str = "local") -> str:
    """``reference_at_runs_rows`` as a table; empty when no row reaches the reference curve."""
    if not any(row[reference] is not None for row in rows):
        return ""
    titles = ["curve", "l1_coefficient", "seeds", "L0", "CE increase", f"{reference} at this L0"]
    titles.append(f"{reference} / run")
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        if row["ratio_range"] is not None:
            ratio += " ({:.2f}–{:.2f})".format(*row["ratio_range"])
        at_l0 = "–" if row[reference] is None else f"{row[reference]:.3f}"
        cells = [row["curve"], str(row["l1_coefficient"]), str(row["n_seeds"])]
        cells += [f"{row['l0']:.1f}", f"{row['ce_loss_increase']:.3f}", at_l0, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_sections(rows: list[dict[str, Any]]) -> str:
    """The markdown a sweep's ``results.md`` adds under its table of runs."""
    points = seed_means(rows)
    sections = []
    if table := seeds_markdown(points):
        heading = "Runs repeated with other seeds: mean ± standard deviation (min–max)"
        sections.append(f"\n## {heading}\n\n{table}")
    if table := matched_l0_markdown(matched_l0_rows(points)):
        heading = (
            "At matched L0: CE-loss increase of each curve (seed means) at the L0 of each local "
            "point, linear in log L0 between runs"
        )
        sections.append(f"\n## {heading}\n\n{table}")
    if table := reference_at_runs_markdown(reference_at_runs_rows(rows)):
        heading = (
            "Each run against the local curve at its L0: seed means, and in brackets the ratio's "
            "range over seeds, each read at its own L0"
        )
        sections.append(f"\n## {heading}\n\n{table}")
    return "".join(sections)


def _seed_groups(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows with every metric of ``SPREAD_METRICS``, grouped by grid point, in first-seen
    order."""
    groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    for row in rows:
        if all(row.get(metric) is not None for metric in SPREAD_METRICS):
            groups.setdefault(_grid_point(row), []).append(row)
    return list(groups.values())


def _ratio(reference: float | None, run: float) -> float | None:
    return reference / run if reference is not None and run else None


def _grid_point(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # Equal for runs that differ only in seed; repr() keeps 1 and 1.0 or "1" apart.
    return tuple((key, repr(row[key])) for key in grid_keys([row]) if key != SEED_KEY)


_COLUMNS = (
    ("L0", "l0", "{:.1f}"),
    ("CE increase", "ce_loss_increase", "{:.3f}"),
    ("KL", "kl_orig_patched", "{:.3f}"),
    ("alive", "alive_features", "{:.0f}"),
)
