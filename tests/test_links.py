"""No write follows a link out of the chosen folder: lock files, sweep grid keys, the previous
run's ``checkpoints`` link under ``overwrite_output``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.runs.output_folder import LOCK_FILENAME, hold_folder
from sae_e2e_plugin.runs.sweep import CLAIM_FILENAME, expand_grid, load_sweep_file, run_sweep

STEP_TOKENS = 4 * CONTEXT


def runner(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(training_tokens=2 * STEP_TOKENS, n_eval_batches=0)
    cfg = make_cfg(tmp_path, **(fields | overrides))
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


@pytest.mark.parametrize("lock_name", [LOCK_FILENAME, CLAIM_FILENAME])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(
    tmp_path: Path, lock_name: str
) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / lock_name).symlink_to(victim)
    with pytest.raises(ValueError, match=rf"its lock file .*{lock_name} is a link"):
        with hold_folder(folder, "output_path", lock_name=lock_name):
            pass
    assert victim.read_text() == "keep me"


def test_a_lock_that_is_a_folder_or_a_dangling_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / LOCK_FILENAME).mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_FILENAME).symlink_to(tmp_path / "nowhere")
    for folder in ("a", "b"):
        with pytest.raises(ValueError, match="not a plain file|is a link"):
            with hold_folder(tmp_path / folder, "output_path"):
                pass
    assert not (tmp_path / "nowhere").exists()


def test_a_run_whose_lock_is_a_link_writes_nothing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / LOCK_FILENAME).symlink_to(victim)
    with pytest.raises(ValueError, match=r"output_path=.*lock file"):
        runner(tmp_path).run()
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "output" / "cfg.json").exists()


@pytest.mark.parametrize("key", ["/tmp/escape", "../escape", "sae./x", "a b", "sae..k", ""])
def test_a_grid_key_that_is_not_a_field_name_is_refused_before_any_folder(
    tmp_path: Path, key: str
) -> None:
    spec = {"base": {}, "grid": {key: [1]}}
    with pytest.raises(ValueError, match=r"grid key .* is not a dotted config field name"):
        run_sweep(spec, tmp_path / "sweep", make_runner=lambda cfg: None, plots=False)
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(ValueError, match="grid key"):
        expand_grid({key: [1]})
    path = tmp_path / "sweep.yaml"
    path.write_text(f"grid: {{{key!r}: [1]}}\n" if key else "grid: {'': [1]}\n")
    with pytest.raises(ValueError, match=rf"{path}: grid key"):
        load_sweep_file(path)


def test_overwrite_output_removes_a_checkpoints_link_not_its_target(tmp_path: Path) -> None:
    output = tmp_path / "output"
    runner(tmp_path, checkpoint_path=str(output / "checkpoints")).run()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    (output / "checkpoints").symlink_to(outside, target_is_directory=True)
    runner(tmp_path, checkpoint_path=str(output / "checkpoints"), overwrite_output=True).run()
    assert (outside / "keep.txt").read_text() == "mine"
    assert not (output / "checkpoints").is_symlink()


def test_overwrite_output_refuses_a_foreign_folder_before_deleting_anything(
    tmp_path: Path,
) -> None:
    output = tmp_path / "output"
    runner(tmp_path).run()
    (output / "eval.json").mkdir()  # not a file any run writes
    before = sorted(p.name for p in output.iterdir())
    with pytest.raises(ValueError, match=r"eval.json is a folder, which no run writes"):
        runner(tmp_path, overwrite_output=True)
    assert sorted(p.name for p in output.iterdir()) == before


def test_a_sweep_run_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    base = {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_pre", "dataset_path": "x"}
    base |= {"sae": {"d_in": 16, "d_sae": 32}, "training_tokens": 4096}
    spec = {"base": base, "grid": {"seed": [1]}}
    (run,) = expand_grid(spec["grid"])
    (tmp_path / "sweep" / "runs").mkdir(parents=True)
    (tmp_path / "sweep" / "runs" / run.run_id).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=rf"{run.run_id} is a link .* only inside output_dir"):
        run_sweep(spec, tmp_path / "sweep", make_runner=lambda cfg: None, plots=False)
    assert list(outside.iterdir()) == []
