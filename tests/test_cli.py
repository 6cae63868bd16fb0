"""The sae-e2e command line: flag parsing, config files, errors, convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_e2e_plugin.cli import field_docs, main, parse_field_flags, parse_value
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig


def test_values_parse_like_yaml_with_exponent_floats() -> None:
    assert parse_value("1e-3") == 0.001
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("[a, b]") == ["a", "b"]
    assert parse_value("blocks.6.hook_resid_pre") == "blocks.6.hook_resid_pre"


def test_flags_nest_on_dots_and_accept_dashes_and_equals() -> None:
    flags = parse_field_flags(["--loss", "e2e", "--sae.d-sae=64", "--logger.log_to_wandb", "false"])
    assert flags == {"loss": "e2e", "sae": {"d_sae": 64}, "logger": {"log_to_wandb": False}}
    with pytest.raises(ValueError, match="flag --lr needs a value"):
        parse_field_flags(["--lr"])


def test_print_config_merges_file_and_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "loss: e2e_downstream\nlr: 0.01\ndataset_path: x\ncontext_size: 16\n"
        "train_batch_size_tokens: 64\nsae: {architecture: topk, d_in: 16, d_sae: 64, k: 4}\n"
        "logger: {log_to_wandb: false}\n"
    )
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--lr",
            "2e-3",
            "--sae.k",
            "8",
            "--downstream_coefficient",
            "2.5",
            "--print-config",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"] == "e2e_downstream" and printed["lr"] == 0.002
    assert printed["downstream_coefficient"] == 2.5
    assert printed["sae"]["architecture"] == "topk" and printed["sae"]["k"] == 8
    assert printed["logger"]["log_to_wandb"] is False
    again = E2ERunnerConfig.from_dict(printed)
    assert again.sae.k == 8


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--los", "e2e"], "--los is not a field of E2ERunnerConfig; did you mean --loss?"),
        (["--sae.d_in", "16", "--sae.d_sea", "3"], "--sae.d_sea is not a field"),
        (["--sae.d_in", "16"], "sae.d_in and sae.d_sae are required"),
        (
            ["--sae.architecture", "nope", "--sae.d_in", "4", "--sae.d_sae", "8"],
            "sae.architecture='nope'",
        ),
        (
            ["--sae.d_in", "16", "--sae.d_sae", "32", "--loss", "e2e_x", "--dataset_path", "x"],
            "loss='e2e_x' is not a known objective",
        ),
    ],
)
def test_bad_flags_exit_2_with_the_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", *argv, "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_help_text_comes_from_the_field_docs(capsys: pytest.CaptureFixture[str]) -> None:
    docs = field_docs(E2ERunnerConfig)
    assert docs["kl_coefficient"].startswith("β_kl, the weight of KL(p_orig ‖ p_patched)")
    assert "number of training tokens" in docs["training_tokens"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--kl_coefficient (default: 1.0)" in out and "β_kl, the weight of KL" in out
    assert "--training_tokens (default: 2000000)" in out


def test_convert_writes_one_sae_lens_folder_per_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_loading import POSITIONS, _write_reference_run

    run = tmp_path / "run"
    _write_reference_run(run)
    assert main(["convert", str(run), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(POSITIONS)
    from sae_lens import SAE

    sae = SAE.load_from_disk(printed[0])
    assert sae.cfg.metadata.hook_name == Path(printed[0]).name
    assert torch.isfinite(sae.W_dec).all()
