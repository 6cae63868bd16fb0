"""Runs repeated with other seeds (``seed`` in a sweep's grid) and the matched-L0 comparison:
means and spreads against hand computations, one curve per objective, a real tiny sweep, and
the example sweep files."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from test_sweep import BASE, Factory

from sae_e2e_plugin.analysis.plots import OBJECTIVE_COLORS, plot_pareto, series_colors
from sae_e2e_plugin.analysis.results import series_label
from sae_e2e_plugin.analysis.seeds import (
    matched_l0_markdown,
    matched_l0_rows,
    reference_at_runs_markdown,
    reference_at_runs_rows,
    seed_means,
    seeds_markdown,
)
from sae_e2e_plugin.runs.sweep import expand_grid, load_sweep_file, run_sweep
from sae_e2e_plugin.training.config.fields import config_from_fields, merge_fields, nest_dotted

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def row(loss: str, coefficient: float, l0: float, ce: float, **grid: Any) -> dict[str, Any]:
    return {
        "run_id": f"{loss}-{coefficient}-{grid}",
        "loss": loss,
        "sae.l1_coefficient": coefficient,
        **grid,
        "l0": l0,
        "alive_features": 10 * l0,
        "ce_loss_increase": ce,
        "kl_orig_patched": ce + 0.5,
        "l0_train_drift": -0.01,
    }


def test_runs_differing_only_in_seed_are_one_point_with_mean_and_spread() -> None:
    rows = [
        row("local", 30.0, 40.0, 1.0),
        row("e2e", 0.002, 45.0, 0.5),
        row("local", 30.0, 50.0, 1.2, seed=2),
        row("local", 30.0, 66.0, 1.7, seed=3),
        row("local", 30.0, 70.0, 9.0, seed=3, training_tokens=10),  # another grid point
    ]
    points = seed_means(rows)
    assert [(p["loss"], p["n_seeds"]) for p in points] == [("local", 3), ("e2e", 1), ("local", 1)]
    local = points[0]
    assert "seed" not in local and local["sae.l1_coefficient"] == 30.0
    assert local["l0"] == pytest.approx(52.0)
    assert local["ce_loss_increase"] == pytest.approx(1.3)
    sd, low, high = local["spread"]["l0"]
    assert sd == pytest.approx(statistics.stdev([40.0, 50.0, 66.0])) and (low, high) == (40, 66)
    assert local["spread"]["kl_orig_patched"][1:] == pytest.approx((1.5, 2.2))
    assert points[1]["spread"]["l0"] == (None, 45.0, 45.0)
    # The seed's value does not make a curve of its own; other grid values do.
    assert series_label(rows[2]) == "local"
    assert series_label(rows[4]) == "local (training_tokens=10)"

    table = seeds_markdown(points).splitlines()
    assert table[0] == "| loss | l1_coefficient | seeds | L0 | CE increase | KL | alive |"
    sd_l0 = statistics.stdev([40.0, 50.0, 66.0])
    sd_ce = statistics.stdev([1.0, 1.2, 1.7])
    assert table[2] == (
        f"| local | 30.0 | 3 | 52.0 ± {sd_l0:.1f} (40.0–66.0) | 1.300 ± {sd_ce:.3f} "
        f"(1.000–1.700) | 1.800 ± {sd_ce:.3f} (1.500–2.200) | 520 ± {10 * sd_l0:.0f} (400–660) |"
    )
    assert len(table) == 3  # points with one seed are left out
    assert seeds_markdown(seed_means(rows[:2])) == ""


def test_matched_l0_reads_each_curve_at_the_local_points_l0() -> None:
    rows = [
        row("local", 10.0, 160.0, 3.0),
        row("local", 30.0, 30.0, 9.0),
        row("local", 30.0, 50.0, 9.0, seed=2),  # seed mean: L0 40
        row("e2e", 0.001, 320.0, 0.6),
        row("e2e", 0.01, 20.0, 2.0),
        row("e2e_downstream", 0.01, 100.0, 1.0),
        row("e2e_downstream", 0.003, 400.0, 0.5),
    ]
    matched = matched_l0_rows(seed_means(rows))
    # Linear in log L0 between e2e's points: at L0 40, a quarter of the way from 20 to 320.
    e2e_at_40 = 2.0 + math.log(40 / 20) / math.log(320 / 20) * (0.6 - 2.0)
    e2e_at_160 = 2.0 + math.log(160 / 20) / math.log(320 / 20) * (0.6 - 2.0)
    ds_at_160 = 1.0 + math.log(160 / 100) / math.log(400 / 100) * (0.5 - 1.0)
    assert [r["L0"] for r in matched] == pytest.approx([40.0, 160.0])
    assert matched[0]["e2e"] == pytest.approx(e2e_at_40)
    assert matched[0]["local / e2e"] == pytest.approx(9.0 / e2e_at_40)
    assert matched[0]["e2e_downstream"] is None  # L0 40 is below its curve
    assert matched[0]["local / e2e_downstream"] is None
    assert matched[1]["e2e"] == pytest.approx(e2e_at_160)
    assert matched[1]["local / e2e_downstream"] == pytest.approx(3.0 / ds_at_160)
    table = matched_l0_markdown(matched).splitlines()
    assert table[0] == (
        "| L0 | local | e2e | local / e2e | e2e_downstream | local / e2e_downstream |"
    )
    assert table[2] == (f"| 40.0 | 9.000 | {e2e_at_40:.3f} | {9.0 / e2e_at_40:.2f}× | – | – |")
    # One objective alone: nothing to compare.
    assert matched_l0_markdown(matched_l0_rows(seed_means(rows[:3]))) == ""


def test_each_run_is_read_against_the_local_curve_at_its_own_l0() -> None:
    rows = [
        row("local", 10.0, 160.0, 3.0),
        row("local", 30.0, 20.0, 9.0),
        row("e2e", 0.002, 40.0, 1.0),
        row("e2e", 0.002, 80.0, 1.5, seed=2),
        row("e2e", 0.02, 10.0, 2.0),  # below local's sparsest run by more than 5%
    ]

    def local_at(l0: float) -> float:  # linear in log L0 between local's two runs
        return 9.0 + math.log(l0 / 20.0) / math.log(160.0 / 20.0) * (3.0 - 9.0)

    seeded, sparse = reference_at_runs_rows(rows)
    assert (seeded["curve"], seeded["l1_coefficient"], seeded["n_seeds"]) == ("e2e", 0.002, 2)
    assert (seeded["l0"], seeded["ce_loss_increase"]) == pytest.approx((60.0, 1.25))
    assert seeded["local"] == pytest.approx(local_at(60.0))
    assert seeded["ratio"] == pytest.approx(local_at(60.0) / 1.25)
    per_seed = sorted([local_at(40.0) / 1.0, local_at(80.0) / 1.5])
    assert seeded["ratio_range"] == pytest.approx(tuple(per_seed))
    assert sparse["local"] is None and sparse["ratio"] is None and sparse["ratio_range"] is None
    table = reference_at_runs_markdown([seeded, sparse]).splitlines()
    assert table[0] == (
        "| curve | l1_coefficient | seeds | L0 | CE increase | local at this L0 | local / run |"
    )
    ratio = local_at(60.0) / 1.25
    assert table[2] == (
        f"| e2e | 0.002 | 2 | 60.0 | 1.250 | {local_at(60.0):.3f} | {ratio:.2f}× "
        f"({per_seed[0]:.2f}–{per_seed[1]:.2f}) |"
    )
    assert table[3] == "| e2e | 0.02 | 1 | 10.0 | 2.000 | – | – |"
    assert reference_at_runs_markdown([sparse]) == ""  # nothing reaches the local curve


def test_a_sweep_with_seeds_in_its_grid_trains_each_seed_and_reports_the_spread(
    tmp_path: Path,
) -> None:
    spec = {
        "base": BASE,
        "grid": [
            {"loss": ["local"], "sae.l1_coefficient": [1e-2]},
            {"loss": ["local"], "sae.l1_coefficient": [1e-2], "seed": [7]},
            {"loss": ["e2e"], "sae.l1_coefficient": [1e-2]},
        ],
    }
    factory = Factory()
    rows = run_sweep(spec, tmp_path, make_runner=factory, plots=False)
    assert [r["run_id"] for r in rows] == [
        "loss=local__l1_coefficient=0.01",
        "loss=local__l1_coefficient=0.01__seed=7",
        "loss=e2e__l1_coefficient=0.01",
    ]
    assert factory.calls[1].seed == 7 and factory.calls[0].seed != 7
    # Another seed is another SAE: a different initialisation and batch order.
    assert rows[0]["ce_loss_increase"] != rows[1]["ce_loss_increase"]
    results = (tmp_path / "results.md").read_text()
    assert "## Runs repeated with other seeds" in results
    assert "## At matched L0" in results
    local = seed_means(rows)[0]
    assert local["n_seeds"] == 2
    assert local["l0"] == pytest.approx((rows[0]["l0"] + rows[1]["l0"]) / 2)
    assert f"| local | 0.01 | 2 | {local['l0']:.1f} ± " in results


def test_the_pareto_plot_of_seeded_runs_is_written_whole(tmp_path: Path) -> None:
    rows = [
        row("local", 30.0, 40.0, 1.0),
        row("local", 30.0, 50.0, 1.2, seed=2),
        row("e2e", 0.002, 45.0, 0.5),
    ]
    path = plot_pareto(rows, x="l0", y="ce_loss_increase", path=tmp_path / "pareto.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]  # no temporary file left


def test_each_objective_keeps_its_colour_in_every_sweeps_plots() -> None:
    rows = [
        row("local", 30.0, 40.0, 1.0, training_tokens=10),
        row("local", 10.0, 90.0, 0.5),
        row("e2e_downstream", 0.01, 20.0, 0.8, downstream_coefficient=0.001),
    ]
    assert series_colors(seed_means(rows)) == {
        "e2e_downstream (downstream_coefficient=0.001)": OBJECTIVE_COLORS["e2e_downstream"],
        "local": OBJECTIVE_COLORS["local"],
        "local (training_tokens=10)": None,  # the objective's second curve: the next colour
    }
    # Without local runs e2e_downstream is no longer the second curve, and keeps its colour.
    assert series_colors(seed_means(rows[2:])) == {
        "e2e_downstream (downstream_coefficient=0.001)": OBJECTIVE_COLORS["e2e_downstream"]
    }


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("sweep_*.yaml")))
def test_every_example_sweep_builds_a_valid_config_for_each_run(name: str) -> None:
    spec = load_sweep_file(EXAMPLES / name)
    runs = expand_grid(spec["grid"])
    assert len({run.run_id for run in runs}) == len(runs)
    for run in runs:
        cfg = config_from_fields(merge_fields(spec["base"], nest_dotted(run.overrides)))
        assert cfg.seed == run.overrides.get("seed", 42)
        if "fair" in name:  # issue 14's comparison: position 0 left out for every objective
            assert tuple(cfg.seqpos_slice) == (1, None)
