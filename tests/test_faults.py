"""Faults during training and runs that meet each other: nothing lost, nothing mixed, clear errors.

Checkpoints are complete or absent (SIGKILL mid-write, a full disk), resume picks the latest
complete one and names any damaged file, an ``output_path`` holding another run is refused,
and Ctrl-C from the command line ends with one line and exit status 130.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import (
    E2ESAETrainingRunner,
    ObjectiveInputs,
    ObjectiveOutput,
    register_objective,
)
from sae_e2e_plugin.cli import EXIT_INTERRUPTED, main
from sae_e2e_plugin.run_files import CHECKPOINT_COMPLETE_FILENAME
from sae_e2e_plugin.runs.output_folder import LOCK_FILENAME, FolderInUseError, hold_folder
from sae_e2e_plugin.training.loop.checkpoints import CheckpointWriteError

TESTS = Path(__file__).parent
STEP_TOKENS = 4 * CONTEXT


def runner(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(training_tokens=4 * STEP_TOKENS, n_eval_batches=0)
    cfg = make_cfg(tmp_path, **(fields | overrides))
    return E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset(seed=4)
    )


def checkpoints(run: E2ESAETrainingRunner) -> list[Path]:
    assert run.cfg.checkpoint_path is not None
    return sorted(Path(run.cfg.checkpoint_path).iterdir())


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes, but the folder lock (it names its latest holder)."""
    files = (p for p in root.rglob("*") if p.is_file() and p.name != LOCK_FILENAME)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoints_default_to_a_folder_inside_output_path(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, checkpoint_path="checkpoints")  # SAELens' default value
    assert cfg.checkpoint_path is not None and cfg.output_path is not None
    assert Path(cfg.checkpoint_path).parent == Path(cfg.output_path) / "checkpoints"


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_one_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = runner(tmp_path, n_checkpoints=2, training_tokens=6 * STEP_TOKENS)
    saves = itertools.count()
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if str(f).endswith("trainer_state.pt") and next(saves) == 1:
            Path(f).write_bytes(b"\x80\x02trunc")  # what a full disk leaves behind
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . basic_ios::clear: iostream error"
            )
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint") as error:
        run.run()
    (first,) = checkpoints(run)  # no half-written folder next to it
    assert (first / CHECKPOINT_COMPLETE_FILENAME).is_file()
    assert f"the latest complete checkpoint, {first}, is intact" in str(error.value)
    assert "basic_ios::clear" in str(error.value)

    monkeypatch.setattr(torch, "save", real_save)
    resumed = runner(
        tmp_path / "again",
        n_checkpoints=2,
        training_tokens=6 * STEP_TOKENS,
        resume_from_checkpoint=str(first.parent),
    )
    resumed.run()
    assert resumed.trainer is not None and resumed.trainer.n_steps_taken == 6


def test_sigkill_while_a_checkpoint_is_written_leaves_only_complete_checkpoints(
    tmp_path: Path,
) -> None:
    script = tmp_path / "killed_run.py"
    script.write_text(
        textwrap.dedent(f"""
        import itertools, os, signal, sys
        from pathlib import Path
        import torch
        sys.path.insert(0, {str(TESTS)!r})
        from conftest import make_cfg, tiny_model, token_dataset
        from sae_e2e_plugin import E2ESAETrainingRunner

        saves, real_save = itertools.count(), torch.save
        def save(obj, f, *args, **kwargs):
            if str(f).endswith("trainer_state.pt") and next(saves) == 1:
                with open(f, "wb") as handle:
                    handle.write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            real_save(obj, f, *args, **kwargs)
        torch.save = save
        cfg = make_cfg(Path({str(tmp_path)!r}), training_tokens={6 * STEP_TOKENS},
                       n_checkpoints=2, n_eval_batches=0)
        E2ESAETrainingRunner(cfg, override_model=tiny_model(),
                             override_dataset=token_dataset(seed=4)).run()
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "checkpoints").iterdir()
    partial, complete = sorted(run_dir.iterdir())  # "." sorts before digits
    assert ".partial-" in partial.name and (complete / CHECKPOINT_COMPLETE_FILENAME).is_file()

    # The run's checkpoint folder resumes from the complete one; the half-written one is refused.
    with pytest.raises(ValueError, match=rf"incomplete checkpoint .*resume from {complete}"):
        runner(tmp_path / "b", resume_from_checkpoint=str(partial))
    resumed = runner(
        tmp_path / "c",
        training_tokens=6 * STEP_TOKENS,
        n_checkpoints=2,
        resume_from_checkpoint=str(run_dir),
    )
    resumed.run()
    assert resumed.trainer is not None and resumed.trainer.n_steps_taken == 6
    # Its own checkpoints were written whole; leftovers of the killed write are not copied over.
    assert all(not p.name.startswith(".") for p in checkpoints(resumed))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda c: (c / "sae_weights.safetensors").write_bytes(b"\x00" * 10),
            r"could not be read.*damaged",
        ),
        (
            lambda c: (c / "activation_scaler.json").write_text("{not json"),
            r"could not be read.*damaged",
        ),
        (lambda c: (c / "trainer_state.pt").write_bytes(b"garbage"), r"could not be read.*damaged"),
        (lambda c: (c / "activation_scaler.json").unlink(), r"lacks activation_scaler.json"),
    ],
    ids=["truncated weights", "garbage json", "garbage trainer state", "missing file"],
)
def test_a_damaged_checkpoint_is_named_with_what_to_do(
    tmp_path: Path, damage: Any, message: str
) -> None:
    run = runner(tmp_path / "a", n_checkpoints=1)
    run.run()
    (checkpoint,) = checkpoints(run)
    damage(checkpoint)
    with pytest.raises(ValueError, match=message) as error:
        runner(tmp_path / "b", resume_from_checkpoint=str(checkpoint)).run()
    assert str(checkpoint) in str(error.value) and "earlier checkpoint" in str(error.value)


def test_a_missing_resume_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"resume_from_checkpoint='.*nowhere' does not exist"):
        runner(tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere")).run()


# ----------------------------------------------------------------------------- output folders


def test_a_second_run_into_the_same_output_path_is_refused_and_loses_nothing(
    tmp_path: Path,
) -> None:
    runner(tmp_path, n_eval_batches=1, eval_batch_size_prompts=2).run()
    output = tmp_path / "output"
    before = tree(output)
    assert {"cfg.json", "eval.json", "training_log.jsonl"} <= set(before)
    with pytest.raises(
        ValueError, match=r"output_path=.*holds a previous run .*overwrite_output=True"
    ):
        runner(tmp_path, sae_cfg=None)
    assert tree(output) == before


def test_overwrite_output_replaces_the_previous_run_entirely(tmp_path: Path) -> None:
    runner(tmp_path, n_eval_batches=1, eval_batch_size_prompts=2).run()
    (tmp_path / "output" / "notes.txt").write_text("mine")  # not the package's: kept
    second = runner(tmp_path, overwrite_output=True, n_eval_batches=0)
    second.run()
    output = tmp_path / "output"
    # The first run's evaluation is gone (this run evaluates nothing), the user's file stays.
    assert not (output / "eval.json").exists()
    assert (output / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


def test_overwrite_deletes_nothing_when_the_new_run_is_refused(tmp_path: Path) -> None:
    runner(tmp_path, n_eval_batches=1, eval_batch_size_prompts=2).run()
    before = tree(tmp_path / "output")
    with pytest.raises(ValueError, match="held-out sequences"):
        runner(tmp_path, overwrite_output=True, n_eval_batches=100, eval_batch_size_prompts=4)
    assert tree(tmp_path / "output") == before


def test_no_staging_folder_is_left_after_an_export(tmp_path: Path) -> None:
    runner(tmp_path).run()
    hidden = [p.name for p in (tmp_path / "output").iterdir() if p.name.startswith(".")]
    assert hidden == [LOCK_FILENAME]


# A process that holds a folder until its stdin closes (or it is killed).
HOLDER = textwrap.dedent(
    """
    import sys
    from sae_e2e_plugin.runs.output_folder import hold_folder
    with hold_folder(sys.argv[1], "output_path"):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def test_a_folder_held_by_a_running_process_is_refused_and_free_once_it_is_killed(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "output"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(
            FolderInUseError,
            match=rf"output_path=.*in use by another running process \(pid {holder.pid} on .*"
            r"choose another output_path",
        ):
            with hold_folder(folder, "output_path"):
                pass
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL leaves no stale lock: the kernel dropped it with the process.
    with hold_folder(folder, "output_path"):
        assert json.loads((folder / LOCK_FILENAME).read_text())["pid"] == os.getpid()


def test_a_run_into_a_folder_another_run_is_writing_stops_before_touching_it(
    tmp_path: Path,
) -> None:
    runner(tmp_path, n_eval_batches=1, eval_batch_size_prompts=2).run()
    output = tmp_path / "output"
    before = tree(output)
    second = runner(tmp_path, overwrite_output=True)
    with hold_folder(output, "output_path"):  # as the other process would
        with pytest.raises(FolderInUseError, match="output_path="):
            second.run()
        # overwrite_output=True, yet the other run's files are untouched.
        assert tree(output) == before


# ----------------------------------------------------------------------------- Ctrl-C


_calls = itertools.count()


def _sigint_on_second_step(inputs: ObjectiveInputs[Any]) -> ObjectiveOutput:
    if next(_calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return ObjectiveOutput(losses={"recon": inputs.reconstruction.pow(2).mean()}, metrics={})


register_objective("test_faults_sigint", _sigint_on_second_step, needs_full_run=False)


def test_ctrl_c_in_the_cli_prints_the_checkpoint_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sae_e2e_plugin.runs.runner as runner_module

    # The CLI loads models by name; hand it the tiny model and dataset instead.
    monkeypatch.setattr(
        runner_module,
        "resolve_builtins",
        lambda cfg, model, dataset: (tiny_model(), token_dataset(seed=4)),
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        textwrap.dedent(f"""
        model_name: tiny
        dataset_path: unused
        is_dataset_tokenized: true
        hook_name: blocks.1.hook_resid_pre
        loss: test_faults_sigint
        context_size: {CONTEXT}
        prepend_bos: false
        train_batch_size_tokens: {STEP_TOKENS}
        training_tokens: {4 * STEP_TOKENS}
        n_batches_in_buffer: 4
        store_batch_size_prompts: 4
        n_eval_batches: 0
        output_path: {tmp_path / "out"}
        sae: {{d_in: 16, d_sae: 32}}
        logger: {{log_to_wandb: false}}
    """)
    )
    assert main(["train", "--config", str(config)]) == EXIT_INTERRUPTED
    # stderr also holds the progress bar (carriage returns, cursor moves): find our line.
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "\n", capsys.readouterr().err.replace("\r", "\n"))
    ours = [line for line in err.splitlines() if line.startswith("sae-e2e")]
    assert len(ours) == 1 and "interrupted; checkpoint written to" in ours[0], err
    checkpoint = Path(ours[0].split("written to ")[1].split(". Resume")[0])
    assert (
        checkpoint.name == str(2 * STEP_TOKENS)
        and (checkpoint / CHECKPOINT_COMPLETE_FILENAME).exists()
    )
    assert checkpoint.is_relative_to(tmp_path / "out" / "checkpoints")


def test_an_interrupted_sweep_says_its_own_command_resumes_it() -> None:
    from sae_e2e_plugin.cli.commands import _interrupted

    interruption = KeyboardInterrupt()
    interruption.checkpoint = Path("runs/a/checkpoints/x/2048")  # type: ignore[attr-defined]
    swept = _interrupted(interruption, sweep=True)
    assert "The same sweep command resumes" in swept and "--resume_from_checkpoint" not in swept
    assert "--resume_from_checkpoint runs/a/checkpoints/x/2048" in _interrupted(interruption)
