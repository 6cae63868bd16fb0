"""Evaluation reads the positions the SAE was trained on, and ``sae-e2e eval`` writes only where
asked: its ``--output``, never an existing file without ``--overwrite``, checked up front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONTEXT, VOCAB, tiny_model
from test_evals import random_sae

from sae_e2e_plugin.cli import main
from sae_e2e_plugin.core.positions import PositionFilter
from sae_e2e_plugin.evaluation.evaluate import evaluate_sae


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, CONTEXT), generator=torch.Generator().manual_seed(1))


def ce(sae: Any, **kwargs: Any) -> float:
    return evaluate_sae(sae, tiny_model(), tokens().split(4), **kwargs).ce_loss_spliced


def test_the_positions_default_to_the_sae_metadata_and_take_the_config_forms() -> None:
    sae = random_sae()
    every = ce(sae)
    explicit = ce(sae, positions=PositionFilter(seqpos_slice=(1, None)))
    assert abs(explicit - every) > 1e-4  # position 0 spliced or not makes a difference
    assert ce(sae, positions=(1, None)) == pytest.approx(explicit, abs=1e-6)
    assert ce(sae, seqpos_slice=[1, None]) == pytest.approx(explicit, abs=1e-6)
    sae.cfg.metadata.seqpos_slice = (1, None)  # as SAELens records a run's slice
    assert ce(sae) == pytest.approx(explicit, abs=1e-6)
    assert ce(sae, seqpos_slice=(None,)) == pytest.approx(every, abs=1e-6)


def test_excluded_tokens_come_from_the_metadata_or_a_list() -> None:
    sae = random_sae()
    listed = ce(sae, exclude_special_tokens=[0, 1, 2])
    assert abs(listed - ce(sae)) > 1e-5
    sae.cfg.metadata.e2e_objective = {"excluded_token_ids": [0, 1, 2]}
    assert ce(sae) == pytest.approx(listed, abs=1e-6)
    assert ce(sae, exclude_special_tokens=False) == pytest.approx(ce(random_sae()), abs=1e-6)


def test_several_saes_default_to_the_positions_their_metadata_records() -> None:
    def pair(first: Any, second: Any) -> dict[str, Any]:
        a, b = random_sae(1, hook="blocks.0.hook_mlp_out"), random_sae(2)
        a.cfg.metadata.seqpos_slice, b.cfg.metadata.seqpos_slice = first, second
        return {"a": a, "b": b}

    def joint(saes: dict[str, Any], **kwargs: Any) -> Any:
        return evaluate_sae(saes, tiny_model(), tokens().split(4), **kwargs)

    recorded = joint(pair((1, None), (1, None)))
    assert recorded.n_spliced == 8 * (CONTEXT - 1)  # position 0 left out, as recorded
    explicit = joint(pair(None, None), seqpos_slice=(1, None))
    assert recorded.ce_loss_spliced == explicit.ce_loss_spliced
    assert joint(pair(None, None)).n_spliced == 8 * CONTEXT
    with pytest.raises(ValueError, match="trained on different positions"):
        joint(pair((1, None), None))
    assert joint(pair((1, None), None), seqpos_slice=(2, None)).n_spliced == 8 * (CONTEXT - 2)
    with pytest.raises(ValueError, match="hook_names is for several SAEs"):
        evaluate_sae(random_sae(), tiny_model(), tokens(), hook_names={"sae": "hook_embed"})
    # Something else where an SAE belongs is named, not met by an AttributeError from inside.
    with pytest.raises(ValueError, match=r"saes\['b'\] is a str, not a SAELens SAE"):
        joint({"a": random_sae(), "b": "runs/b"})
    with pytest.raises(ValueError, match=r"^sae is a PosixPath, not a SAELens SAE"):
        evaluate_sae(Path("runs/b"), tiny_model(), tokens())  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"positions": (1, "x")}, "seqpos_slice=(1, 'x') is not a slice"),
        ({"seqpos_slice": (1, None, 0)}, "seqpos_slice=(1, None, 0)"),
        ({"seqpos_slice": "1:"}, "seqpos_slice='1:'"),
        ({"seqpos_slice": ()}, "seqpos_slice=()"),
        ({"exclude_special_tokens": "bos"}, "exclude_special_tokens='bos'"),
        ({"exclude_special_tokens": [-1]}, "exclude_special_tokens=[-1]"),
    ],
)
def test_bad_positions_are_refused_by_name(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError) as error:
        ce(random_sae(), **kwargs)
    assert named in str(error.value)


@pytest.fixture
def saved_sae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An SAE trained on positions 1: (its metadata says so), saved; the CLI's model and data
    loaders replaced by the tiny model and fixed tokens."""
    sae = random_sae()
    sae.cfg.metadata.seqpos_slice = (1, None)
    sae.cfg.metadata.model_name = "tiny"
    sae.cfg.metadata.dataset_path = "somewhere"
    sae.cfg.metadata.context_size = CONTEXT
    folder = tmp_path / "run"
    sae.save_model(folder)
    (folder / "eval.json").write_text('{"mine": 1}')
    import sae_e2e_plugin.assets.language_model as language_model
    import sae_e2e_plugin.cli.eval_command as eval_command

    monkeypatch.setattr(language_model, "load_language_model", lambda *a, **k: tiny_model())
    monkeypatch.setattr(eval_command, "_eval_tokens", lambda *a, **k: tokens())
    return folder


def test_cli_eval_splices_the_trained_positions_and_writes_nothing_unasked(
    saved_sae: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(saved_sae)  # run from inside the run folder
    before = sorted(p.name for p in saved_sae.iterdir())
    assert main(["eval", ".", "--batch_size", "4"]) == 0
    assert sorted(p.name for p in saved_sae.iterdir()) == before
    assert json.loads((saved_sae / "eval.json").read_text()) == {"mine": 1}
    assert "not written to a file" in capsys.readouterr().out

    out = saved_sae.parent / "e.json"
    assert main(["eval", ".", "--batch_size", "4", "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = ce(random_sae(), positions=(1, None))
    assert written["ce_loss_spliced"] == pytest.approx(expected, abs=1e-5)
    assert (
        main(["eval", ".", "--batch_size", "4", "--output", str(out), "--seqpos_slice", "0:"]) == 2
    )
    assert (
        main(
            [
                "eval",
                ".",
                "--batch_size",
                "4",
                "--output",
                str(out),
                "--seqpos_slice",
                "0:",
                "--overwrite",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["ce_loss_spliced"] == pytest.approx(
        ce(random_sae()), abs=1e-5
    )


@pytest.mark.parametrize(
    ("output", "named"),
    [
        ("exists.json", "exists; pass --overwrite"),
        ("folder", "is a folder"),
        ("a-file/eval.json", "is not a writable folder"),
    ],
)
def test_cli_eval_refuses_an_output_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str, named: str
) -> None:
    (tmp_path / "exists.json").write_text("keep")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("")
    code = main(["eval", str(tmp_path / "no-sae-here"), "--output", str(tmp_path / output)])
    err = capsys.readouterr().err
    assert code == 2 and f"--output {tmp_path / output}" in err and named in err
    assert (tmp_path / "exists.json").read_text() == "keep"


@pytest.mark.parametrize("text", ["1", "a:b", "1:2:0", "1:2:3:4"])
def test_cli_eval_refuses_a_seqpos_slice_flag_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--seqpos_slice", text])
    assert f"--seqpos_slice: {text!r}" in capsys.readouterr().err.replace('"', "'")


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--n_sequences", "0"), ("--batch_size", "-1"), ("--context_size", "0")]
    + [("--alive_window_tokens", "x")],
)
def test_cli_eval_refuses_a_count_below_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), flag, value])
    assert f"argument {flag}: {value!r}" in capsys.readouterr().err


def test_cli_eval_of_a_path_that_is_not_a_folder_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert f"sae={str(tmp_path / 'nowhere')!r} is not a folder" in capsys.readouterr().err
