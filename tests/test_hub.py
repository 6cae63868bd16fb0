"""Starting from pretrained SAEs (local, hub cache, reference format) and the upload dry run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import pytest
import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from test_loading import _fake_hub_cache

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.interop.hub import upload_sae

HOOK = "blocks.1.hook_resid_pre"


def exported_sae(tmp_path: Path, **sae_overrides: Any) -> Path:
    """A SAELens inference folder for the tiny model's hook (random weights)."""
    fields: dict[str, Any] = dict(
        d_in=D_MODEL, d_sae=64, metadata=sae_lens.saes.sae.SAEMetadata(hook_name=HOOK)
    )
    fields.update(sae_overrides)
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**fields))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    folder = tmp_path / "pretrained"
    sae.save_model(folder)
    return folder


def runner_from(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    cfg = make_cfg(tmp_path, training_tokens=3 * 4 * CONTEXT, n_eval_batches=1, **overrides)
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def assert_starts_from(runner: E2ESAETrainingRunner, folder: Path) -> None:
    pretrained = sae_lens.SAE.load_from_disk(str(folder))
    for name, tensor in pretrained.state_dict().items():
        torch.testing.assert_close(runner.sae.state_dict()[name], tensor, msg=name)


def test_fine_tunes_a_local_sae_lens_folder(tmp_path: Path) -> None:
    folder = exported_sae(tmp_path)
    runner = runner_from(tmp_path, pretrained_sae=str(folder))
    assert_starts_from(runner, folder)
    before = runner.sae.W_dec.detach().clone()
    runner.run()
    assert not torch.equal(runner.sae.W_dec, before)
    meta = json.loads((Path(runner.cfg.output_path or "") / "cfg.json").read_text())["metadata"]
    # The folder's name only: cfg.json carries no local path of this machine.
    assert meta["pretrained_from"] == folder.name and meta["e2e_objective"]["loss"] == "e2e"


def test_fine_tunes_a_sae_lens_repo_from_an_offline_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = exported_sae(tmp_path)
    files = {f"layer1/{p.name}": p for p in folder.iterdir()}
    _fake_hub_cache(tmp_path / "hub", "someone/tiny-saes", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    runner = runner_from(tmp_path, pretrained_sae="someone/tiny-saes", pretrained_sae_id="layer1")
    assert_starts_from(runner, folder)
    runner.run()
    assert runner.sae.cfg.metadata.pretrained_from == "someone/tiny-saes:layer1"


def test_fine_tunes_a_reference_format_run(tmp_path: Path) -> None:
    from test_loading import _write_reference_run

    run = tmp_path / "reference"
    _write_reference_run(run)  # positions blocks.0.hook_resid_pre and blocks.1.hook_resid_post
    sae_cfg = sae_lens.StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64, apply_b_dec_to_input=False)
    runner = runner_from(
        tmp_path,
        sae_cfg=sae_cfg,
        hook_name="blocks.0.hook_resid_pre",
        pretrained_sae=str(run),
        pretrained_sae_id="blocks.0.hook_resid_pre",
    )
    # The decoder rows arrive unit-normalised, as the reference's forward uses them.
    torch.testing.assert_close(runner.sae.W_dec.norm(dim=-1), torch.ones(64))
    runner.run()


@pytest.mark.parametrize(
    ("sae_overrides", "run_overrides", "message"),
    [
        ({"d_sae": 32}, {}, r"has sae.d_sae=32 but the run has 64: set sae.d_sae=32"),
        (
            {"apply_b_dec_to_input": False},
            {},
            r"sae.apply_b_dec_to_input=False but the run has True",
        ),
        (
            {},
            {"hook_name": "blocks.2.hook_resid_pre"},
            r"hook_name='blocks.1.hook_resid_pre' but the run has 'blocks.2.hook_resid_pre'",
        ),
    ],
)
def test_mismatched_pretrained_sae_is_refused(
    tmp_path: Path, sae_overrides: dict[str, Any], run_overrides: dict[str, Any], message: str
) -> None:
    folder = exported_sae(tmp_path, **sae_overrides)
    with pytest.raises(ValueError, match=message):
        runner_from(tmp_path, pretrained_sae=str(folder), **run_overrides)


def test_a_missing_local_folder_is_named_not_sent_to_the_hub(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-sae")
    with pytest.raises(ValueError, match=rf"pretrained_sae='{missing}' does not exist"):
        runner_from(tmp_path, pretrained_sae=missing, pretrained_sae_id="x")


def test_a_release_needs_an_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set pretrained_sae_id"):
        runner_from(tmp_path, pretrained_sae="gpt2-small-res_sle-ajt")
    with pytest.raises(ValueError, match="pretrained_sae_id='x' is set without pretrained_sae"):
        make_cfg(tmp_path, pretrained_sae_id="x")


def test_upload_dry_run_writes_exactly_what_would_be_uploaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = runner_from(tmp_path)
    runner.run()
    out = Path(runner.cfg.output_path or "")
    dry = tmp_path / "dry"
    assert main(["upload", str(out), "me/tiny-e2e", "--sae-id", HOOK, "--dry-run", str(dry)]) == 0
    written = sorted(p.relative_to(dry).as_posix() for p in dry.rglob("*") if p.is_file())
    assert written == sorted(
        ["README.md"]
        + [
            f"{HOOK}/{n}"
            for n in (
                "cfg.json",
                "runner_cfg.json",
                "sae_weights.safetensors",
                "sparsity.safetensors",
            )
        ]
    )
    assert (dry / HOOK / "sae_weights.safetensors").read_bytes() == (
        out / "sae_weights.safetensors"
    ).read_bytes()
    assert 'SAE.from_pretrained("me/tiny-e2e", "<sae_id>")' in (dry / "README.md").read_text()
    assert "would upload" in capsys.readouterr().out
    loaded = sae_lens.SAE.load_from_disk(str(dry / HOOK))
    assert loaded.cfg.metadata.e2e_objective["loss"] == "e2e"
    with pytest.raises(ValueError, match="has no cfg.json"):
        upload_sae(tmp_path, "me/x", "y", dry_run=dry)
