"""Nothing is written outside the folders the user chose, no file from elsewhere is unpickled
with code in it, and no local path of this machine goes out in an upload."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset
from test_hub import HOOK, exported_sae
from test_loading import POSITIONS, _reference_saes, _write_reference_run

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.interop.hub import upload_sae
from sae_e2e_plugin.interop.local_paths import without_local_paths
from sae_e2e_plugin.interop.reference import convert_reference_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*model_from_pretrained_kwargs:UserWarning")


def tree(root: Path) -> set[str]:
    """Every path under ``root``, relative, links included (not followed)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def strings(value: Any) -> list[str]:
    """Every string value in a JSON-like structure."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def crafted_run(folder: Path, prefix: str) -> Path:
    """A reference run whose state dict keys one SAE under ``prefix`` (any string)."""
    _write_reference_run(folder, samples=(1,))
    sae = _reference_saes(seed=0, positions=[POSITIONS[0]])[POSITIONS[0].replace(".", "-")]
    state = {f"{prefix}.{name}": tensor for name, tensor in sae.state_dict().items()}
    torch.save(state, folder / "samples_1.pt")
    config = yaml.safe_load((folder / "final_config.yaml").read_text())
    config["saes"]["sae_positions"] = ["evil"]  # matches both crafted names below
    (folder / "final_config.yaml").write_text(yaml.safe_dump(config))
    return folder / "samples_1.pt"


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_convert_refuses_a_state_dict_key_that_leaves_the_output_folder(
    tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "outside"
    prefix = str(outside / "evil") if kind == "absolute" else "../outside/evil"
    checkpoint = crafted_run(tmp_path / "run", prefix)
    before = tree(tmp_path)
    with pytest.raises(ValueError) as refused:
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")
    message = str(refused.value)
    assert repr(f"{prefix}.encoder.0.weight") in message
    assert str(checkpoint) in message
    assert "plain hook name" in message and "'blocks.6.hook_resid_pre'" in message
    assert tree(tmp_path) == before
    assert not outside.exists()


def test_convert_command_reports_the_crafted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crafted_run(tmp_path / "run", "../outside/evil")
    before = tree(tmp_path)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "'../outside/evil.encoder.0.weight'" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_convert_refuses_a_config_position_used_as_folder_name(tmp_path: Path) -> None:
    """The reference's one-SAE upload layout takes the folder name from saes.sae_positions."""
    run = tmp_path / "run"
    _write_reference_run(run, positions=["../escaped"], samples=(1,))
    sae = _reference_saes(seed=0, positions=[POSITIONS[0]])[POSITIONS[0].replace(".", "-")]
    state = {name.replace("encoder.0", "encoder"): t for name, t in sae.state_dict().items()}
    torch.save(state, run / "samples_1.pt")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="plain hook name") as refused:
        convert_reference_checkpoint(run / "samples_1.pt", tmp_path / "out")
    assert "saes.sae_positions" in str(refused.value)
    assert str(run / "final_config.yaml") in str(refused.value)
    assert "'../escaped'" in str(refused.value)
    assert tree(tmp_path) == before


def test_convert_refuses_a_folder_that_links_out_of_the_output_folder(tmp_path: Path) -> None:
    _write_reference_run(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / POSITIONS[0]).symlink_to(tmp_path / "elsewhere")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="outside the chosen folder") as refused:
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")
    assert POSITIONS[0] in str(refused.value)
    # Refused before anything was written, the other position included.
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------- upload

BAD_SAE_IDS = ["../X", "a/../../X", "{tmp}/abs/X", "~/X", "./X", "a//b", "", "..\\X"]
"""Refused ids; ``{tmp}`` is the test's temporary folder (an absolute path)."""


@pytest.mark.parametrize("sae_id", BAD_SAE_IDS)
def test_dry_run_refuses_an_sae_id_outside_the_folder(tmp_path: Path, sae_id: str) -> None:
    sae_id = sae_id.format(tmp=tmp_path)
    folder = exported_sae(tmp_path)
    (tmp_path / "dry").mkdir()
    before = tree(tmp_path)
    with pytest.raises(ValueError) as refused:
        upload_sae(folder, "me/x", sae_id, dry_run=tmp_path / "dry")
    assert f"sae_id={sae_id!r}" in str(refused.value)
    assert "no '..'" in str(refused.value)
    assert tree(tmp_path) == before


def test_upload_command_refuses_dotdot_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = exported_sae(tmp_path)
    before = tree(tmp_path)
    args = ["upload", str(folder), "me/x", "--sae-id", "../X", "--dry-run", str(tmp_path / "d")]
    assert main(args) == 2
    assert "sae_id='../X'" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_dry_run_refuses_an_sae_id_that_links_out(tmp_path: Path) -> None:
    folder = exported_sae(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dry").mkdir()
    (tmp_path / "dry" / "link").symlink_to(tmp_path / "elsewhere")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="outside the chosen folder"):
        upload_sae(folder, "me/x", "link/blocks.1", dry_run=tmp_path / "dry")
    assert tree(tmp_path) == before


def test_real_upload_refuses_the_same_ids_before_sending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sae_lens

    calls: list[Any] = []
    monkeypatch.setattr(sae_lens, "upload_saes_to_huggingface", lambda *a, **k: calls.append(a))
    folder = exported_sae(tmp_path)
    for sae_id in (bad.format(tmp=tmp_path) for bad in BAD_SAE_IDS):
        with pytest.raises(ValueError, match="not a relative path inside the repo"):
            upload_sae(folder, "me/x", sae_id)
    assert calls == []
    upload_sae(folder, "me/x", "layer_1/width_64")  # nested ids are fine
    assert len(calls) == 1


def write_runner_cfg_with_local_paths(folder: Path, tmp_path: Path) -> None:
    """A runner_cfg.json as SAELens writes it: absolute output and checkpoint paths."""
    (tmp_path / "my_tokens").mkdir()
    cfg = {
        "output_path": str(tmp_path / "output"),
        "checkpoint_path": str(tmp_path / "checkpoints" / "1a2b"),
        "resume_from_checkpoint": None,
        "dataset_path": str(tmp_path / "my_tokens"),
        "eval_dataset_path": "NeelNanda/pile-10k",
        "model_from_pretrained_kwargs": {"cache_dir": str(tmp_path / "hf")},
        "lr": 3e-3,
    }
    (folder / "runner_cfg.json").write_text(json.dumps(cfg))


def test_upload_sends_runner_cfg_without_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sae_lens

    folder = exported_sae(tmp_path)
    write_runner_cfg_with_local_paths(folder, tmp_path)
    sent: dict[str, Any] = {}

    def fake_upload(saes: dict[str, Path], hf_repo_id: str) -> None:
        (sae_id, path), *_ = saes.items()
        sent[sae_id] = json.loads((Path(path) / "runner_cfg.json").read_text())

    monkeypatch.setattr(sae_lens, "upload_saes_to_huggingface", fake_upload)
    upload_sae(folder, "me/x", HOOK)
    upload_sae(folder, "me/x", HOOK, dry_run=tmp_path / "dry")
    dry = json.loads((tmp_path / "dry" / HOOK / "runner_cfg.json").read_text())
    for published in (sent[HOOK], dry):
        assert not [s for s in strings(published) if str(tmp_path) in s], published
        assert published["output_path"] == "output"
        assert published["checkpoint_path"] == "1a2b"
        assert published["dataset_path"] == "my_tokens"
        assert published["eval_dataset_path"] == "NeelNanda/pile-10k"  # a hub id stays
        assert published["lr"] == 3e-3


def test_a_trained_run_exports_runner_cfg_without_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative local dataset folder must go too
    Path("local_corpus").mkdir()
    cfg = make_cfg(
        tmp_path, training_tokens=4 * CONTEXT, n_eval_batches=0, dataset_path="local_corpus"
    )
    E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset()).run()
    exported = json.loads((tmp_path / "output" / "runner_cfg.json").read_text())
    assert not [s for s in strings(exported) if str(tmp_path) in s], exported
    assert exported["output_path"] == "output"
    assert exported["dataset_path"] == "local_corpus"
    assert exported["checkpoint_path"] == Path(cfg.checkpoint_path or "").name
    assert exported["hook_name"] == "blocks.1.hook_resid_pre"  # the rest is as SAELens wrote it


def test_without_local_paths_keeps_hub_ids_and_plain_values() -> None:
    cfg = {"dataset_path": "org/data", "model_name": "gpt2", "nested": ["/a/b/c", 1, None]}
    assert without_local_paths(cfg) == {
        "dataset_path": "org/data",
        "model_name": "gpt2",
        "nested": ["c", 1, None],
    }


# ----------------------------------------------------------------------------- resume


class RunsCode:
    """Unpickling this runs a shell command, as a crafted trainer_state.pt could."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_trainer_state_that_would_run_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four steps: the checkpoint is mid-run (a finished run's is refused before it is read).
    common: dict[str, Any] = dict(training_tokens=4 * 4 * CONTEXT, n_eval_batches=0)
    first = E2ESAETrainingRunner(
        make_cfg(tmp_path / "a", n_checkpoints=1, **common),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    first.run()
    (checkpoint,) = [p for p in Path(first.cfg.checkpoint_path or "").iterdir() if p.is_dir()]
    state_file = checkpoint / "trainer_state.pt"
    marker = tmp_path / "pwned"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "optimizer": RunsCode(marker)}, state_file)
    # What a bare torch.load does under torch < 2.6, and with this variable set on any torch.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    resumed = E2ESAETrainingRunner(
        make_cfg(tmp_path / "b", resume_from_checkpoint=str(checkpoint), **common),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    with pytest.raises(ValueError) as refused:
        resumed.run()
    message = str(refused.value)
    assert str(state_file) in message
    assert "could run code" in message and "system" in message
    assert "weights_only=False" not in message  # torch's advice is not passed on
    assert not marker.exists()
