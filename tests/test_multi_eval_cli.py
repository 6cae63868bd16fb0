"""``sae-e2e eval`` of several SAEs spliced in together: a run folder of several, or folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CONTEXT, tiny_model, token_dataset
from sae_lens import SAE
from test_multi_sae import multi_runner, sae_cfg

from sae_e2e_plugin import evaluate_sae
from sae_e2e_plugin.cli import main

HOOKS = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}


@pytest.fixture
def joint_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A joint run of two SAEs trained on positions 1: (exported into output/a, output/b);
    the CLI's model and data loaders replaced by the tiny model and fixed tokens."""
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        HOOKS,
        "joint",
        seqpos_slice=(1, None),
        training_tokens=3 * 4 * CONTEXT,
        n_eval_batches=0,
    )
    runner.run()
    import sae_e2e_plugin.assets.language_model as language_model
    import sae_e2e_plugin.cli.eval_command as eval_command

    monkeypatch.setattr(language_model, "load_language_model", lambda *a, **k: tiny_model())
    monkeypatch.setattr(eval_command, "_eval_tokens", lambda *a, **k: eval_tokens())
    return tmp_path / "output"


def eval_tokens() -> torch.Tensor:
    return torch.tensor(token_dataset(n_rows=8, seed=11)["tokens"])


def test_a_run_folder_of_several_saes_is_evaluated_jointly_on_their_positions(
    joint_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "joint.json"
    assert main(["eval", str(joint_run), "--batch_size", "4", "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    saes = {name: SAE.load_from_disk(str(joint_run / name)) for name in HOOKS}
    expected = evaluate_sae(
        saes, tiny_model(), eval_tokens().split(4), positions=(1, None)
    ).to_dict()
    assert written["hook_names"] == HOOKS
    assert written["kl_orig_patched"] == pytest.approx(expected["kl_orig_patched"], rel=1e-6)
    assert written["l0"] == pytest.approx(expected["l0"], rel=1e-6)
    assert written["n_spliced"] == 8 * (CONTEXT - 1)  # position 0 left out, as trained
    # The same two SAEs named one by one give the same table.
    again = tmp_path / "again.json"
    folders = [str(joint_run / name) for name in HOOKS]
    assert main(["eval", *folders, "--batch_size", "4", "--output", str(again)]) == 0
    assert json.loads(again.read_text()) == written


def test_several_saes_refuse_one_sae_flags_and_mixed_positions(
    joint_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(joint_run), "--hook_name", "blocks.1.hook_resid_pre"]) == 2
    assert "--hook_name is for one SAE" in capsys.readouterr().err
    other = SAE.load_from_disk(str(joint_run / "b"))
    other.cfg.metadata.seqpos_slice = (None,)
    other.save_model(str(joint_run.parent / "b-all"))
    assert main(["eval", str(joint_run / "a"), str(joint_run.parent / "b-all")]) == 2
    assert "trained on different positions" in capsys.readouterr().err
