"""Loaders name the file they refuse (damaged or hostile ``cfg.json``, ``final_config.yaml``,
``.pt``), and credentials and local paths never land in an exported SAE or an upload."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset
from test_evals import random_sae
from test_loading import _write_reference_run

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.interop.hub import upload_sae
from sae_e2e_plugin.interop.reference import convert_reference_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*model_from_pretrained_kwargs:UserWarning")


class Hostile:
    """Pickles as a call to ``os.system``: loading it would run a command."""

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("echo pwned",))


CFG_DAMAGE = [
    (lambda p: p.write_text('{"d_in": 16, "d_sae"'), "is not valid JSON"),
    (lambda p: p.write_bytes(b'{"d_in": "\xff"}'), "is not UTF-8 text (byte 10)"),
    (lambda p: p.write_text("[1, 2]"), "holds a list, not a mapping"),
    (lambda p: p.unlink(), "cfg.json does not exist"),
]


@pytest.mark.parametrize(
    ("damage", "named"), CFG_DAMAGE, ids=["truncated", "latin", "list", "gone"]
)
def test_sae_e2e_eval_names_a_damaged_cfg_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Any, named: str
) -> None:
    random_sae().save_model(tmp_path / "sae")
    damage(tmp_path / "sae" / "cfg.json")
    assert main(["eval", str(tmp_path / "sae"), "--model_name", "tiny"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "sae" / "cfg.json") in err and named in err and "Traceback" not in err


def test_damaged_weights_are_named_with_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    random_sae().save_model(tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"\x00" * 9)
    assert main(["eval", str(tmp_path / "sae")]) == 2
    err = capsys.readouterr().err
    assert f"the SAE in {tmp_path / 'sae'} cannot be loaded" in err
    assert "sae_weights.safetensors is damaged" in err


def test_a_damaged_pretrained_sae_is_named(tmp_path: Path) -> None:
    random_sae().save_model(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text("{")
    with pytest.raises(ValueError, match=r"pretrained_sae=.*cfg.json is not valid JSON"):
        E2ESAETrainingRunner(
            make_cfg(tmp_path, pretrained_sae=str(tmp_path / "sae")),
            override_model=tiny_model(),
            override_dataset=token_dataset(),
        )


def test_a_reference_config_with_a_python_tag_is_refused_naming_it(tmp_path: Path) -> None:
    _write_reference_run(tmp_path / "ref")
    config = tmp_path / "ref" / "final_config.yaml"
    config.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="could not determine a constructor") as error:
        convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")
    assert str(config) in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (lambda: pickle.dumps({"x": Hostile()}), "loading it could run code"),
        (lambda: b"PK\x03\x04 truncated", "cannot be read as a torch file"),
        (lambda: b"", "cannot be read as a torch file"),
    ],
    ids=["code", "truncated", "empty"],
)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_hostile_or_damaged_reference_pt_is_refused_naming_it(
    tmp_path: Path, content: Any, named: str
) -> None:
    _write_reference_run(tmp_path / "ref", samples=(900,))
    (pt,) = (tmp_path / "ref").glob("*.pt")
    pt.write_bytes(content())
    with pytest.raises(ValueError) as error:
        convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")
    message = str(error.value)
    assert str(pt) in message and named in message and "weights_only=False" not in message


def test_a_token_and_home_paths_stay_out_of_the_export_and_the_upload(tmp_path: Path) -> None:
    secret = "hf_s3cr3tT0ken"
    cfg = make_cfg(
        tmp_path,
        training_tokens=4 * 4 * CONTEXT,
        n_eval_batches=0,
        n_checkpoints=1,
        model_from_pretrained_kwargs={"token": secret, "cache_dir": "~/hf-cache"},
    )
    runner = E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )
    runner.run()
    output = tmp_path / "output"
    for name in ("cfg.json", "runner_cfg.json"):
        text = (output / name).read_text()
        assert secret not in text and "~/hf-cache" not in text, name
        assert str(tmp_path) not in text, name
    written = upload_sae(output, "me/x", "blocks.1", dry_run=tmp_path / "dry")
    for path in written:
        if path.suffix == ".json":
            assert secret not in path.read_text()
    kwargs = json.loads((output / "runner_cfg.json").read_text())["model_from_pretrained_kwargs"]
    assert kwargs == {"token": "<removed>", "cache_dir": "hf-cache"}
    # Nowhere on disk: the checkpoints' runner_cfg.json (SAELens') too.
    written_files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.parent.parent.name == "checkpoints" for p in written_files)
    assert not [p for p in written_files if secret.encode() in p.read_bytes()]


def test_a_state_dict_of_tensors_still_converts(tmp_path: Path) -> None:
    _write_reference_run(tmp_path / "ref", samples=(900,))
    (pt,) = (tmp_path / "ref").glob("*.pt")
    assert isinstance(torch.load(pt, weights_only=True), dict)
    assert len(convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")) == 2


def test_convert_refuses_to_replace_an_sae_and_writes_nothing(tmp_path: Path) -> None:
    _write_reference_run(tmp_path / "ref", samples=(900,))
    first = convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")
    before = {p: p.read_bytes() for folder in first for p in folder.iterdir()}
    with pytest.raises(ValueError, match="already holds an SAE; converting would replace it"):
        convert_reference_checkpoint(tmp_path / "ref", tmp_path / "out")
    assert {p: p.read_bytes() for folder in first for p in folder.iterdir()} == before


def test_a_damaged_eval_json_in_a_sweep_is_named_with_the_fix(tmp_path: Path) -> None:
    from sae_e2e_plugin.analysis.results import read_training_log, run_row

    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text('{"ce_loss_increase": 0.')
    with pytest.raises(ValueError, match=r"eval.json is not valid JSON .* --reevaluate"):
        run_row(run_dir, "a", {})
    (run_dir / "training_log.jsonl").write_text('{"step": 1, "l0": 3}\n{"step": 2, "l')
    assert read_training_log(run_dir / "training_log.jsonl") == [{"step": 1, "l0": 3}]


def test_the_wandb_config_carries_no_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from sae_lens import LoggingConfig

    from sae_e2e_plugin import E2ESAETrainingRunner

    configs: list[dict[str, Any]] = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: configs.append(kwargs["config"]))
    monkeypatch.setattr(wandb, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(wandb, "finish", lambda: None)
    monkeypatch.setattr(wandb, "Histogram", lambda *args, **kwargs: None)
    cfg = make_cfg(
        tmp_path,
        training_tokens=2 * 4 * 8,
        n_eval_batches=0,
        checkpoint_path=None,
        output_path=None,
        model_from_pretrained_kwargs={"token": "hf_do_not_log_me", "revision": "main"},
        logger=LoggingConfig(log_to_wandb=True),
    )
    E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset()).run()
    (logged,) = configs
    assert "hf_do_not_log_me" not in json.dumps(logged, default=str)
    assert logged["model_from_pretrained_kwargs"]["revision"] == "main"  # the rest is kept
