"""sae-e2e sweep: grid expansion, results, plots, and resume after an interruption."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, D_MODEL, tiny_model, token_dataset
from safetensors.torch import load_file, save_file

from sae_e2e_plugin.analysis.results import (
    training_l0_summary,
    training_loss_summary,
    training_time_summary,
)
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.runs.output_folder import hold_folder
from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner
from sae_e2e_plugin.runs.sweep import (
    CLAIM_FILENAME,
    expand_grid,
    latest_checkpoint,
    load_sweep_file,
    reevaluate_sweep,
    report_sweep,
    run_sweep,
)

BASE: dict[str, Any] = {
    "model_name": "tiny",
    "hook_name": "blocks.1.hook_resid_pre",
    "dataset_path": "unused",
    "context_size": CONTEXT,
    "prepend_bos": False,
    "train_batch_size_tokens": 4 * CONTEXT,
    "training_tokens": 4 * 4 * CONTEXT,
    "store_batch_size_prompts": 4,
    "n_batches_in_buffer": 4,
    "n_eval_batches": 2,
    "lr": 3e-3,
    "verbose": False,
    "sae": {"architecture": "standard", "d_in": D_MODEL, "d_sae": 32},
    "logger": {"log_to_wandb": False},
}
SPEC = {"base": BASE, "grid": {"loss": ["local", "e2e"], "sae.l1_coefficient": [1e-3, 1e-2]}}


class Factory:
    """Builds runners on the tiny model; can fail on a chosen call to simulate a crash."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls: list[Any] = []
        self.fail_on_call = fail_on_call

    def __call__(self, cfg: Any) -> E2ESAETrainingRunner:
        self.calls.append(cfg)
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("simulated interruption")
        return E2ESAETrainingRunner(
            cfg, override_model=tiny_model(), override_dataset=token_dataset()
        )


def test_grid_expands_every_combination_with_readable_ids() -> None:
    runs = expand_grid(SPEC["grid"])
    assert [r.run_id for r in runs] == [
        "loss=local__l1_coefficient=0.001",
        "loss=local__l1_coefficient=0.01",
        "loss=e2e__l1_coefficient=0.001",
        "loss=e2e__l1_coefficient=0.01",
    ]
    assert runs[3].overrides == {"loss": "e2e", "sae.l1_coefficient": 0.01}


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path: Path) -> None:
    crashing = Factory(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(SPEC, tmp_path, make_runner=crashing, plots=False)
    finished = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/eval.json"))
    assert finished == ["loss=local__l1_coefficient=0.001", "loss=local__l1_coefficient=0.01"]

    again = Factory()
    rows = run_sweep(SPEC, tmp_path, make_runner=again)
    assert [Path(c.output_path).name for c in again.calls] == [
        "loss=e2e__l1_coefficient=0.001",
        "loss=e2e__l1_coefficient=0.01",
    ]
    assert len(rows) == 4 and {r["loss"] for r in rows} == {"local", "e2e"}
    assert all(r["l0"] is not None and r["ce_loss_increase"] is not None for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == rows
    assert (
        (tmp_path / "results.csv")
        .read_text()
        .splitlines()[0]
        .startswith("run_id,loss,sae.l1_coefficient,l0")
    )
    table, *sections = (tmp_path / "results.md").read_text().split("\n\n## ")
    table = table.splitlines()
    assert table[0].startswith("| loss | l1_coefficient | L0 | alive | CE increase |")
    assert len(table) == 2 + 4
    # No seeds repeated; local and e2e compared at each local run's L0.
    assert len(sections) == 1 and sections[0].startswith("At matched L0")
    first_e2e = next(r for r in sorted(rows, key=lambda r: -r["l0"]) if r["loss"] == "e2e")
    assert f"| e2e | {first_e2e['sae.l1_coefficient']} | {first_e2e['l0']:.1f} |" in table[2]
    for row in rows:  # 4 steps per run: too few tenths to judge settling
        assert row["l0_train_end"] is None and row["l0_train_drift"] is None
        assert row["loss_train_drift"] is None
        assert row["train_seconds"] > 0 and row["step_seconds_local"] is None
    for name in (
        "pareto_l0.png",
        "pareto_alive.png",
        "cosine_within.png",
        "cosine_across.png",
        "training_l0.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_an_unfinished_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    spec = {"base": {**BASE, "n_checkpoints": 1}, "grid": {"loss": ["e2e"]}}
    factory = Factory()
    run_dir = tmp_path / "runs" / "loss=e2e"
    # A first attempt that stopped after its checkpoint, before the final evaluation.
    first = factory(_cfg_for(spec, run_dir, eval_at_end=False))
    first.run()
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and not (run_dir / "eval.json").exists()
    run_sweep(spec, tmp_path, make_runner=factory, plots=False)
    resumed_cfg = factory.calls[-1]
    assert resumed_cfg.resume_from_checkpoint == str(checkpoint)
    assert (run_dir / "eval.json").exists()


def test_processes_sharing_a_sweep_each_train_the_runs_no_other_holds(tmp_path: Path) -> None:
    held = tmp_path / "runs" / "loss=local__l1_coefficient=0.01"
    first = Factory()
    with hold_folder(held, "run", lock_name=CLAIM_FILENAME):  # as another sweep process would
        rows = run_sweep(SPEC, tmp_path, make_runner=first, plots=False)
    trained = [Path(c.output_path).name for c in first.calls]
    assert trained == [
        "loss=local__l1_coefficient=0.001",
        "loss=e2e__l1_coefficient=0.001",
        "loss=e2e__l1_coefficient=0.01",
    ]
    assert sorted(r["run_id"] for r in rows) == sorted(trained)
    assert not (held / "eval.json").exists()
    # A run held by a process outside any sweep (sae-e2e train into its folder) is left too.
    other = tmp_path / "runs" / "loss=e2e__l1_coefficient=0.01"
    (other / "eval.json").unlink()
    second = Factory()
    with hold_folder(held, "run", lock_name=CLAIM_FILENAME), hold_folder(other, "output_path"):
        rows = run_sweep(SPEC, tmp_path, make_runner=second, plots=False)
    assert [Path(c.output_path).name for c in second.calls] == [other.name]  # tried, refused
    assert len(rows) == 2 and not (other / "eval.json").exists()
    # Once the other processes are gone, the same command takes the runs they left.
    third = Factory()
    rows = run_sweep(SPEC, tmp_path, make_runner=third, plots=False)
    assert [Path(c.output_path).name for c in third.calls] == [held.name, other.name]
    assert len(rows) == 4


def test_a_sweep_folder_refuses_another_base_but_takes_a_grown_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"base": BASE, "grid": {"loss": ["local"]}}
    run_sweep(spec, tmp_path, make_runner=Factory(), plots=False)
    changed = {
        "base": {**BASE, "lr": 1e-2, "sae": {**BASE["sae"], "d_sae": 64}},
        "grid": spec["grid"],
    }
    with pytest.raises(
        ValueError,
        match=r"another base \(lr: 0\.003 -> 0\.01, sae\.d_sae: 32 -> 64\).*choose another output_dir",
    ):
        run_sweep(changed, tmp_path, make_runner=lambda cfg: pytest.fail("must not train"))
    sweep_file = tmp_path / "changed.yaml"
    sweep_file.write_text(json.dumps({**changed, "output_dir": str(tmp_path)}))
    assert main(["sweep", "--config", str(sweep_file)]) == 2  # a usage error, as a bad field
    assert "sae-e2e sweep: error: output_dir=" in capsys.readouterr().err
    # A grid that grows (same base) continues the sweep.
    grown = Factory()
    rows = run_sweep({**spec, "grid": {"loss": ["local", "e2e"]}}, tmp_path, make_runner=grown)
    assert [Path(c.output_path).name for c in grown.calls] == ["loss=e2e"] and len(rows) == 2


def test_report_writes_the_finished_runs_table_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_file = tmp_path / "sweep.json"
    output = tmp_path / "out"

    def report(**spec: Any) -> int:
        sweep_file.write_text(json.dumps({**spec, "output_dir": str(output)}))
        return main(["sweep", "--config", str(sweep_file), "--report", "--no-plots"])

    assert report(base=BASE, grid={"loss": ["local"]}) == 2  # nothing started there yet
    assert "holds no sweep to report on" in capsys.readouterr().err
    assert not output.exists()
    run_sweep({"base": BASE, "grid": {"loss": ["local"]}}, output, make_runner=Factory())
    for name in ("results.md", "results.csv", "results.json"):
        (output / name).unlink()
    # The grid has grown since: its new run is reported as missing, not trained.
    assert report(base=BASE, grid={"loss": ["local", "e2e"]}) == 0
    assert "1 finished runs" in capsys.readouterr().out
    table = (output / "results.md").read_text().split("\n\n")[0].splitlines()
    assert len(table) == 3 and table[2].startswith("| local |")
    assert sorted(p.name for p in (output / "runs").iterdir()) == ["loss=local"]
    assert report(base={**BASE, "lr": 1e-2}, grid={"loss": ["local"]}) == 2
    assert "another base (lr: 0.003 -> 0.01)" in capsys.readouterr().err


def test_a_sweep_without_its_weights_still_reports_and_keeps_its_cosine_plots(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As in a clone of a repository that commits its runs without their weights.
    spec = {"base": BASE, "grid": {"loss": ["local", "e2e"]}}
    run_sweep(spec, tmp_path, make_runner=Factory())
    cosine_plots = {name: (tmp_path / name).read_bytes() for name in COSINE_PLOTS}
    geometry = [row["max_cosine_median"] for row in report_sweep(spec, tmp_path)]
    for weights in tmp_path.glob("runs/*/sae_weights.safetensors"):
        weights.unlink()
    (tmp_path / "pareto_l0.png").unlink()
    rows = report_sweep(spec, tmp_path)
    assert len(rows) == 2 and (tmp_path / "pareto_l0.png").stat().st_size > 1000
    # The geometry recorded while the weights were there stands.
    assert [row["max_cosine_median"] for row in rows] == geometry
    assert {name: (tmp_path / name).read_bytes() for name in COSINE_PLOTS} == cosine_plots
    assert "no SAE weights in runs ['loss=local', 'loss=e2e']" in caplog.text


def test_each_run_records_the_geometry_of_the_weights_it_has(tmp_path: Path) -> None:
    spec = {"base": BASE, "grid": {"loss": ["local"]}}
    weights_file = tmp_path / "runs" / "loss=local" / "sae_weights.safetensors"

    def by_hand() -> tuple[float, float]:
        w = load_file(weights_file)["W_dec"].double()
        unit = w / w.norm(dim=-1, keepdim=True)
        best = [
            max(float(unit[i] @ unit[j]) for j in range(len(w)) if j != i) for i in range(len(w))
        ]
        return statistics.median(best), sum(b > 0.99 for b in best) / len(best)

    (row,) = run_sweep(spec, tmp_path, make_runner=Factory(), plots=False)
    median, duplicates = by_hand()
    assert row["max_cosine_median"] == pytest.approx(median, abs=1e-6)
    assert row["near_duplicate_fraction"] == pytest.approx(duplicates)
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "| expl. var. | median max cos | near-dup. |" in header
    # Other weights in the same folder (the run trained again): the geometry is redone.
    weights = load_file(weights_file)
    weights["W_dec"][1:4] = weights["W_dec"][0]  # four copies of one direction
    save_file(weights, weights_file)
    (again,) = report_sweep(spec, tmp_path)
    median, duplicates = by_hand()
    assert duplicates >= 4 / 32 and again["near_duplicate_fraction"] == pytest.approx(duplicates)
    assert again["max_cosine_median"] == pytest.approx(median, abs=1e-6)


def test_reevaluate_rewrites_each_finished_runs_eval_and_trains_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"base": BASE, "grid": {"loss": ["local", "e2e"]}}
    run_sweep(spec, tmp_path, make_runner=Factory(), plots=False)
    local, e2e = (tmp_path / "runs" / name for name in ("loss=local", "loss=e2e"))
    original = {run: json.loads((run / "eval.json").read_text()) for run in (local, e2e)}
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for run in (local, e2e):  # as written by an older evaluation
        stale = {**original[run], "ce_loss_zero_ablation": 9.0, "ce_loss_score": 0.5}
        (run / "eval.json").write_text(json.dumps(stale))
    (e2e / "sae_weights.safetensors").unlink()
    factory = Factory()
    rows = reevaluate_sweep(spec, tmp_path, make_runner=factory, plots=False)
    # Evaluated again from the exported weights: the same numbers the run wrote at its end.
    again = json.loads((local / "eval.json").read_text())
    assert again.keys() == original[local].keys()
    for key, value in original[local].items():
        assert again[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value)
    assert json.loads((e2e / "eval.json").read_text())["ce_loss_zero_ablation"] == 9.0
    assert "loss=e2e: not evaluated again, its SAE weights are not kept" in caplog.text
    assert [Path(c.output_path).name for c in factory.calls] == ["loss=local"]
    assert [row["ce_loss_score"] for row in rows] == [again["ce_loss_score"], 0.5]
    # Nothing trained, nothing removed: every file but the deleted weights is still there.
    files_after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert set(files_before) - set(files_after) == {Path("runs/loss=e2e/sae_weights.safetensors")}
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({**spec, "output_dir": str(tmp_path)}))
    assert main(["sweep", "--config", str(sweep_file), "--report", "--reevaluate"]) == 2
    assert "choose one" in capsys.readouterr().err


COSINE_PLOTS = ("cosine_within.png", "cosine_across.png")


def _cfg_for(spec: dict[str, Any], run_dir: Path, **extra: Any) -> Any:
    from sae_e2e_plugin.runs.sweep import _run_fields, expand_grid
    from sae_e2e_plugin.training.config.fields import config_from_fields

    fields = _run_fields(spec["base"], expand_grid(spec["grid"])[0], run_dir)
    return config_from_fields({**fields, **extra})


def test_bad_sweep_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("base: {}\n")
    with pytest.raises(ValueError, match="needs a non-empty 'grid' mapping"):
        load_sweep_file(path)
    path.write_text("grid: {loss: e2e}\n")
    with pytest.raises(ValueError, match="grid.loss must be a non-empty list"):
        load_sweep_file(path)


def test_a_list_of_grids_joins_their_products_without_duplicates() -> None:
    runs = expand_grid(
        [
            {"loss": ["local"], "sae.l1_coefficient": [1.0, 2.0]},
            {"loss": ["e2e", "local"], "sae.l1_coefficient": [0.1, 1.0]},
        ]
    )
    assert [r.run_id for r in runs] == [
        "loss=local__l1_coefficient=1.0",
        "loss=local__l1_coefficient=2.0",
        "loss=e2e__l1_coefficient=0.1",
        "loss=e2e__l1_coefficient=1.0",
        "loss=local__l1_coefficient=0.1",
    ]


def test_training_l0_summary_compares_the_last_two_tenths(tmp_path: Path) -> None:
    log = tmp_path / "training_log.jsonl"
    l0 = [100.0 - k for k in range(20)] + [50.0, 52.0]  # 22 steps: tenths of 2 steps
    log.write_text(
        "".join(
            json.dumps({"step": k + 1, "tokens": 8 * (k + 1), "l0": v}) + "\n"
            for k, v in enumerate(l0)
        )
    )
    summary = training_l0_summary(log)
    assert summary["l0_train_end"] == pytest.approx(51.0)
    assert summary["l0_train_drift"] == pytest.approx((51.0 - 81.5) / 81.5)
    assert training_l0_summary(tmp_path / "missing.jsonl") == {
        "l0_train_end": None,
        "l0_train_drift": None,
    }


def test_training_loss_summary_reads_the_last_phase_only(tmp_path: Path) -> None:
    log = tmp_path / "training_log.jsonl"
    # 30 local steps with a large MSE, then 20 e2e steps: tenths of the e2e phase are 2 steps.
    rows = [{"phase": "local", "total_loss": 1000.0}] * 30
    rows += [{"phase": "e2e", "total_loss": 3.0 - 0.1 * k} for k in range(20)]
    log.write_text("".join(json.dumps({"step": k + 1, **r}) + "\n" for k, r in enumerate(rows)))
    summary = training_loss_summary(log)
    assert summary["loss_train_end"] == pytest.approx((1.2 + 1.1) / 2)
    assert summary["loss_train_drift"] == pytest.approx((1.15 - 1.35) / 1.35)
    assert training_loss_summary(tmp_path / "missing.jsonl") == {
        "loss_train_end": None,
        "loss_train_drift": None,
    }


def test_training_time_summary_sums_the_rows_and_takes_each_phases_median(tmp_path: Path) -> None:
    log = tmp_path / "training_log.jsonl"
    rows = [("local", 1.0), ("local", 9.0), ("local", 2.0), ("e2e", 5.0), ("e2e", 7.0)]
    log.write_text(
        "".join(
            json.dumps({"step": k + 1, "phase": phase, "seconds": seconds}) + "\n"
            for k, (phase, seconds) in enumerate(rows)
        )
    )
    assert training_time_summary(log) == {
        "train_seconds": 24.0,
        "step_seconds_local": 2.0,
        "step_seconds_e2e": 6.0,
    }
    # A log from before the rows carried seconds (the committed sweeps) has no times.
    log.write_text(json.dumps({"step": 1, "l0": 3.0}) + "\n")
    assert set(training_time_summary(log).values()) == {None}


def test_grids_setting_different_fields_share_one_table(tmp_path: Path) -> None:
    spec = {
        "base": {**BASE, "loss": "e2e_downstream"},
        "grid": [
            {"sae.l1_coefficient": [1e-3]},
            {"downstream_coefficient": [0.5], "sae.l1_coefficient": [1e-3]},
        ],
    }
    rows = run_sweep(spec, tmp_path, make_runner=Factory(), plots=False)
    assert [r["run_id"] for r in rows] == [
        "l1_coefficient=0.001",
        "downstream_coefficient=0.5__l1_coefficient=0.001",
    ]
    header, first, second = (tmp_path / "results.csv").read_text().splitlines()
    assert header.startswith("run_id,sae.l1_coefficient,") and ",downstream_coefficient" in header
    column = header.split(",").index("downstream_coefficient")
    assert first.split(",")[column] == "" and second.split(",")[column] == "0.5"
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| l1_coefficient | downstream_coefficient | L0 |")
    assert sorted(line.split(" | ")[1] for line in table[2:]) == ["0.5", "–"]


def test_runs_with_other_grid_values_are_their_own_plot_series() -> None:
    from sae_e2e_plugin.analysis.results import series_label

    row = {
        "run_id": "x",
        "loss": "local",
        "sae.l1_coefficient": 30.0,
        "l0": 5.0,
        "l0_train_end": 5.0,
        "l0_train_drift": 0.0,
    }
    assert series_label(row) == "local"
    assert series_label({**row, "training_tokens": 409600}) == "local (training_tokens=409600)"


def test_schedule_rows_gain_the_gap_they_close_and_the_table_shows_it() -> None:
    from sae_e2e_plugin.analysis.results import results_markdown, with_gap_closed

    def row(loss: str, l0: float, ce: float, **grid: Any) -> dict[str, Any]:
        return {"run_id": f"{loss}{l0}", "loss": loss, **grid, "l0": l0, "ce_loss_increase": ce}

    rows = [
        row("local", 40.0, 9.0),
        row("local", 160.0, 3.0),
        row("e2e", 20.0, 2.0),
        row("e2e", 320.0, 0.6),
        row("e2e", 80.0, 1.0, e2e_fraction=0.1),
        row("e2e", 10.0, 1.0, e2e_fraction=0.25),
    ]
    out = with_gap_closed(rows)
    # At L0 80: local halfway (log L0) from 9 to 3 = 6; e2e halfway from 2 to 0.6 = 1.3.
    assert out[4]["gap_closed"] == pytest.approx((6.0 - 1.0) / (6.0 - 1.3))
    assert out[5]["gap_closed"] is None  # L0 10 is below every local run
    assert all("gap_closed" not in r for r in out[:4]) and "gap_closed" not in rows[4]
    table = results_markdown(out).splitlines()
    assert table[0].endswith("| CE increase | gap closed |")
    assert sorted(line.split(" | ")[-1] for line in table[2:]) == ["106% |"] + ["– |"] * 5
    # Without schedule runs the column is left out.
    assert "gap closed" not in results_markdown(rows[:4])
