"""A full disk ends with one line naming the file, and never leaves half a training-log row that
blocks a resume; a killed checkpoint write's staging folder goes at the next start."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.run_files import DiskFullError, atomic_write_text
from sae_e2e_plugin.training.loop.checkpoints import ResumeError
from sae_e2e_plugin.training.loop.training_log import append_row, truncate_after

STEP_TOKENS = 4 * CONTEXT
BASE = ["--hook_name", "blocks.1.hook_resid_pre", "--dataset_path", "x", "--sae.d_in", "16"]
BASE += ["--sae.d_sae", "64", "--training_tokens", str(4 * STEP_TOKENS), "--context_size", "8"]
BASE += ["--train_batch_size_tokens", str(STEP_TOKENS)]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def runner(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(training_tokens=4 * STEP_TOKENS, n_eval_batches=0)
    cfg = make_cfg(tmp_path, **(fields | overrides))
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def test_a_log_row_is_written_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "training_log.jsonl"
    append_row(log, {"step": 1, "loss": 0.5})
    before = log.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 20:  # the row: half goes down, then the disk is full
            real_write(fd, data[: len(data) // 2])
            raise ENOSPC
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=rf"no space left on the device to write {log}"):
        append_row(log, {"step": 2, "loss": 0.25, "padding": "x" * 40})
    assert log.read_bytes() == before


def test_a_damaged_last_row_is_dropped_on_resume_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "training_log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    with caplog.at_level(logging.WARNING):
        truncate_after(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "dropped its damaged last row (line 4)" in caplog.text


def test_a_damaged_row_in_the_middle_is_refused_naming_the_line(tmp_path: Path) -> None:
    log = tmp_path / "training_log.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ResumeError, match=rf"{log}, line 2, is not a training-log row"):
        truncate_after(log, 3)


def test_a_run_resumes_over_half_a_log_row_and_a_killed_checkpoint_write(tmp_path: Path) -> None:
    first = runner(tmp_path, n_checkpoints=1)
    first.run()
    assert first.cfg.checkpoint_path is not None
    (checkpoint,) = Path(first.cfg.checkpoint_path).iterdir()
    staging = checkpoint.parent / f".{int(checkpoint.name) + STEP_TOKENS}.partial-0badf00d"
    staging.mkdir()
    (staging / "sae_weights.safetensors").write_bytes(b"half")
    log = tmp_path / "output" / "training_log.jsonl"
    with log.open("a") as handle:
        handle.write('{"step": 5, "total_lo')  # what a full disk left
    resumed = runner(tmp_path, n_checkpoints=1, resume_from_checkpoint=str(checkpoint))
    assert not staging.exists()
    resumed.run()
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_atomic_write_on_a_full_disk_names_the_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int) -> None:
        raise ENOSPC

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"eval.json, .* bytes free; 6 bytes were to be"):
        atomic_write_text(tmp_path / "eval.json", "{}\n\n\n\n")
    assert list(tmp_path.iterdir()) == []


def test_the_final_eval_json_on_a_full_disk_ends_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith("eval.json"):
            raise ENOSPC
        real_replace(src, dst)

    run = runner(tmp_path, n_eval_batches=1, eval_batch_size_prompts=2, n_checkpoints=1)
    monkeypatch.setattr(os, "replace", replace)
    import sae_e2e_plugin.runs.runner as runner_module

    with pytest.MonkeyPatch.context() as building:

        def built(cfg: Any) -> E2ESAETrainingRunner:
            building.undo()  # the class again, for its own super() calls
            return run

        building.setattr(runner_module, "E2ESAETrainingRunner", built)
        assert main(["train", "--model_name", "tiny", *BASE]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("sae-e2e train: error: no space left on the device to write")
    assert "eval.json" in last and "The latest complete checkpoint is" in last


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tmp_path: Path) -> None:
    stale = tmp_path / "output" / ".export-deadbeef"
    stale.mkdir(parents=True)
    (stale / "sae_weights.safetensors").write_bytes(b"half")
    runner(tmp_path, overwrite_output=True).run()
    assert not stale.exists() and (tmp_path / "output" / "cfg.json").is_file()
