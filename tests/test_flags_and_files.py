"""Every flag and file is read as its declared type or refused by name: slices, mappings, lists,
repeated flags and keys, YAML errors, folders and non-UTF-8 files given as configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_cfg, tiny_model
from sae_lens import StandardSAE, StandardSAEConfig

from sae_e2e_plugin.cli import main, parse_field_flags
from sae_e2e_plugin.evaluation.evaluate import evaluate_sae
from sae_e2e_plugin.runs.sweep import load_sweep_file
from sae_e2e_plugin.training.config.fields import config_from_fields

BASE = ["--model_name", "tiny", "--hook_name", "blocks.1.hook_resid_pre", "--dataset_path", "x"]
BASE += ["--sae.d_in", "16", "--sae.d_sae", "32", "--training_tokens", "409600"]


def printed_config(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    assert main(["train", *BASE, *flags, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1:", [1, None]), ("1:5", [1, 5]), (":-1", [None, -1]), ("::2", [None, None, 2])]
    + [("[1, null]", [1, None])],
)
def test_a_seqpos_slice_flag_is_read_as_a_slice(
    capsys: pytest.CaptureFixture[str], text: str, expected: list[Any]
) -> None:
    assert printed_config(capsys, "--seqpos_slice", text)["seqpos_slice"] == expected


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--seqpos_slice", "1"], "seqpos_slice=1 is not a slice of positions"),
        (["--seqpos_slice", "a:b"], "seqpos_slice='a:b' is not a slice"),
        (["--seqpos_slice", "1:2:0"], "seqpos_slice=[1, 2, 0] is not a slice"),
        (["--seqpos_slice", "{a: 1}"], "seqpos_slice={'a': 1} is not a slice"),
        (["--model_kwargs", "foo"], "model_kwargs='foo' is not a mapping"),
        (["--model_from_pretrained_kwargs", "[1]"], "model_from_pretrained_kwargs=[1] is not a"),
        (["--exclude_special_tokens", "some"], "exclude_special_tokens='some' is neither"),
        (["--exclude_special_tokens", "[-1]"], "exclude_special_tokens=[-1] is neither"),
        (["--downstream_hooks", "{a: 1}"], "downstream_hooks={'a': 1} is not a list"),
        (["--distributed_backend", "mpi"], "distributed_backend='mpi' is not one of 'auto'"),
        (["--sae.reshape_activations", "x"], "sae.reshape_activations='x' is not one of"),
        (["--sequence_separator_token", "foo"], "sequence_separator_token='foo' is not one of"),
        (["--dtype", "int7"], "dtype='int7' is not a dtype"),
        (["--sae.dtype", "half"], "sae.dtype='half' is not a dtype"),
        (["--sae.metadata", "x"], "sae.metadata is written by the run"),
        (["--lr", "1e-3", "--lr", "1e-4"], "flag --lr is given twice"),
        (["--sae.k", "4", "--sae.k=8"], "flag --sae.k is given twice"),
    ],
)
def test_a_flag_of_the_wrong_shape_is_refused_by_name(
    capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    assert named in refused(capsys, "train", *BASE, *flags, "--print-config")


def test_a_dict_field_is_built_from_dotted_flags(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = printed_config(capsys, "--model_kwargs.foo", "1", "--exclude_special_tokens", "[0, 3]")
    assert cfg["model_kwargs"] == {"foo": 1} and cfg["exclude_special_tokens"] == [0, 3]


def test_the_python_api_refuses_containers_of_the_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"seqpos_slice=\(1, 'x'\) is not a slice"):
        make_cfg(tmp_path, seqpos_slice=(1, "x"))
    with pytest.raises(ValueError, match="model_kwargs='foo' is not a mapping"):
        make_cfg(tmp_path, model_kwargs="foo")
    assert make_cfg(tmp_path, seqpos_slice=[1, None]).seqpos_slice == (1, None)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"lr: 1e-3\nloss: e2e\nlr: 1e-4\n", "the key 'lr' is given twice (lines 1 and 3)"),
        (b"sae: {d_in: 16, d_in: 8}\n", "the key 'd_in' is given twice"),
        (b"lr: [1e-3\n", "line 2, column 1"),
        (b"loss: e2e\n\tlr: 1\n", "line 2"),
        (b"lr: 0.001\nrun_name: caf\xe9\n", "is not UTF-8 text (byte 23"),
        (b"!!python/object/apply:os.system [echo hi]\n", "could not determine a constructor"),
        (b"- 1\n- 2\n", "expected a mapping of config fields, got list"),
    ],
    ids=["repeated key", "repeated nested key", "syntax", "tab", "latin-1", "python tag", "list"],
)
def test_a_config_file_that_cannot_be_read_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, named: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    err = refused(capsys, "train", "--config", str(path))
    assert str(path) in err and named in err and "Traceback" not in err


def test_a_folder_or_a_missing_file_as_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert f"--config {tmp_path} is a folder" in refused(capsys, "train", "--config", str(tmp_path))
    missing = tmp_path / "nope.yaml"
    assert f"--config {missing}: no such file" in refused(capsys, "train", "--config", str(missing))
    assert f"sweep file {tmp_path} is a folder" in refused(
        capsys, "sweep", "--config", str(tmp_path)
    )


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("grid: {loss: [e2e]}\ngrids: {lr: [1]}\n", "'grids' is not a sweep file key"),
        ("base: {lr: 1}\nbase: {lr: 2}\ngrid: {loss: [e2e]}\n", "the key 'base' is given twice"),
        ("grid: {loss: [e2e], loss: [local]}\n", "the key 'loss' is given twice"),
        ("grid: {loss: [e2e]\n", "line 2"),
    ],
)
def test_a_sweep_file_with_unknown_or_repeated_keys_is_refused(
    tmp_path: Path, content: str, named: str
) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        load_sweep_file(path)
    assert named in str(error.value) and str(path) in str(error.value)


def test_flag_values_keep_their_yaml_reading_where_no_colon_is_involved() -> None:
    flags = parse_field_flags(["--hook_name", "blocks.1.hook_resid_pre", "--dataset_path", "a/b"])
    assert flags == {"hook_name": "blocks.1.hook_resid_pre", "dataset_path": "a/b"}
    fields = {**parse_field_flags(BASE), **parse_field_flags(["--seqpos_slice", "2:"])}
    assert config_from_fields(fields).seqpos_slice == (2, None)


@pytest.mark.parametrize(("d_in", "d_sae"), [(16, 0), (0, 8)])
@pytest.mark.filterwarnings("ignore:Initializing zero-element")
def test_an_sae_of_size_zero_is_refused_by_evaluation(d_in: int, d_sae: int) -> None:
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    size = "d_sae" if d_sae == 0 else "d_in"
    with pytest.raises(ValueError, match=rf"sae.cfg.{size}=0"):
        evaluate_sae(
            sae,
            tiny_model(),
            torch.zeros(2, 8, dtype=torch.long),
            hook_name="blocks.1.hook_resid_pre",
        )


def test_a_config_changed_after_it_was_built_is_checked_again(tmp_path: Path) -> None:
    from conftest import token_dataset

    from sae_e2e_plugin import E2ESAETrainingRunner

    cfg = make_cfg(tmp_path)
    cfg.sae.d_sae = 0  # Python code may set a field after the config checked it
    with pytest.raises(ValueError, match=r"sae.d_sae must be >= 1 .* got 0"):
        E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())
    with pytest.raises(ValueError, match="override_dataset is a list; pass a datasets Dataset"):
        E2ESAETrainingRunner(make_cfg(tmp_path), override_model=tiny_model(), override_dataset=[1])


def test_a_sweep_with_a_bad_grid_value_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    from sae_e2e_plugin.runs.sweep import run_sweep

    base = {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_pre", "dataset_path": "x"}
    base |= {"sae": {"d_in": 16, "d_sae": 32}, "training_tokens": 4096}
    spec = {"base": base, "grid": {"lr": [1e-3, "abc"]}}
    with pytest.raises(ValueError, match=r"run lr=abc of the sweep: lr='abc' is not a number"):
        run_sweep(spec, tmp_path / "sweep", make_runner=lambda cfg: None, plots=False)
    assert not (tmp_path / "sweep").exists()
