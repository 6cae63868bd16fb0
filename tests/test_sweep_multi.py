"""Sweeps whose runs train several SAEs: grids over ``saes.<name>.<field>``, one result row per
SAE, finished runs kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import D_MODEL, tiny_model, token_dataset
from test_sweep import BASE

from sae_e2e_plugin import E2EMultiRunnerConfig, E2EMultiSAETrainingRunner
from sae_e2e_plugin.runs.sweep import reevaluate_sweep, run_sweep

MULTI_BASE: dict[str, Any] = {k: v for k, v in BASE.items() if k not in ("sae", "hook_name")} | {
    "saes": {
        "early": {"architecture": "standard", "d_in": D_MODEL, "d_sae": 32},
        "late": {"architecture": "topk", "d_in": D_MODEL, "d_sae": 32, "k": 4},
    },
    "hook_names": {"early": "blocks.0.hook_resid_post", "late": "blocks.2.hook_resid_pre"},
    "splice": "joint",
    "loss": "e2e",
}
SPEC = {"base": MULTI_BASE, "grid": {"saes.late.k": [2, 6]}}


def multi_factory(calls: list[Any]) -> Any:
    def make(cfg: Any) -> E2EMultiSAETrainingRunner:
        calls.append(cfg)
        return E2EMultiSAETrainingRunner(
            cfg, override_model=tiny_model(), override_dataset=token_dataset()
        )

    return make


def test_a_grid_over_an_sae_field_trains_each_run_and_reports_each_sae(tmp_path: Path) -> None:
    calls: list[Any] = []
    rows = run_sweep(SPEC, tmp_path, make_runner=multi_factory(calls), plots=False)
    assert [type(cfg) for cfg in calls] == [E2EMultiRunnerConfig] * 2
    assert [cfg.saes["late"].k for cfg in calls] == [2, 6]
    assert [cfg.saes["early"].d_sae for cfg in calls] == [32, 32]
    by_id = {row["run_id"]: row for row in rows}
    assert sorted(by_id) == sorted(f"k={k}/{name}" for k in (2, 6) for name in ("early", "late"))
    for k in (2, 6):
        for name in ("early", "late"):
            row = by_id[f"k={k}/{name}"]
            assert row["sae"] == name and row["saes.late.k"] == k
            written = json.loads((tmp_path / "runs" / f"k={k}" / name / "eval.json").read_text())
            assert row["l0"] == written["l0"]
    # The top-k SAE's L0 follows its k (a batch's L0 is k for a top-k SAE).
    assert by_id["k=2/late"]["l0"] < by_id["k=6/late"]["l0"]
    # A second start keeps the finished runs.
    again: list[Any] = []
    rows_again = run_sweep(SPEC, tmp_path, make_runner=multi_factory(again), plots=False)
    assert again == [] and len(rows_again) == 4


def test_reevaluating_a_sweep_of_several_saes_rewrites_each_saes_and_the_joint_evaluation(
    tmp_path: Path,
) -> None:
    spec = {"base": MULTI_BASE, "grid": {"saes.late.k": [2]}}
    run_sweep(spec, tmp_path, make_runner=multi_factory([]), plots=False)
    run_dir = tmp_path / "runs" / "k=2"
    files = {
        path: json.loads(path.read_text())
        for path in [run_dir / "early" / "eval.json", run_dir / "late" / "eval.json"]
        + [run_dir / "joint_eval.json"]
    }
    for path, written in files.items():  # as an older evaluation might have written them
        path.write_text(json.dumps({**written, "ce_loss_increase": 99.0}))
    calls: list[Any] = []
    rows = reevaluate_sweep(spec, tmp_path, make_runner=multi_factory(calls), plots=False)
    assert len(calls) == 1  # one runner built, nothing trained
    for path, written in files.items():
        again = json.loads(path.read_text())
        assert again["ce_loss_increase"] == written["ce_loss_increase"] != 99.0
        assert again["kl_orig_patched"] == written["kl_orig_patched"]
    assert sorted(row["run_id"] for row in rows) == ["k=2/early", "k=2/late"]
