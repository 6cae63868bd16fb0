"""Reference-format (e2e_sae) checkpoints: conversion, SAELens converters, errors. No network."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from sae_lens import SAE
from torch import nn

from sae_e2e_plugin.interop.reference import (
    REFERENCE_WEIGHT_PROCESSING,
    convert_reference_checkpoint,
    reference_format_disk_loader,
)
from sae_e2e_plugin.interop.reference_hub import reference_format_loader

# Every converted SAE carries model_from_pretrained_kwargs, about which SAELens warns on load.
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*model_from_pretrained_kwargs:UserWarning")

D_IN = 16
RATIO = 4.0
POSITIONS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"]


class _RefSAE(nn.Module):
    """Same module tree as the reference SAE, so torch itself produces the state-dict keys."""

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, d_sae), nn.ReLU())
        self.decoder = nn.Linear(d_sae, d_in)


def _reference_saes(seed: int, positions: list[str], d_sae: int | None = None) -> nn.ModuleDict:
    """Random reference SAEs with un-normalised decoders (column norms far from 1)."""
    torch.manual_seed(seed)
    saes = nn.ModuleDict()
    for pos in positions:
        sae = _RefSAE(D_IN, d_sae or int(RATIO * D_IN))
        with torch.no_grad():
            sae.decoder.weight.mul_(torch.rand(1, sae.decoder.weight.shape[1]) * 5 + 0.5)
            sae.decoder.bias.normal_()
        saes[pos.replace(".", "-")] = sae
    return saes


def _write_reference_run(
    folder: Path, positions: Any = POSITIONS, samples: tuple[int, ...] = (900, 10000), **cfg: Any
) -> dict[int, nn.ModuleDict]:
    """A run folder as the reference's training script leaves it; returns the SAEs per N."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tlens_model_name": "gpt2-small",
        "tlens_model_path": None,
        "train_data": {"dataset_name": "some/tokenized-dataset", "n_ctx": 1024},
        "saes": {"sae_positions": positions, "dict_size_to_input_ratio": RATIO},
        **cfg,
    }
    (folder / "final_config.yaml").write_text(yaml.safe_dump(config))
    runs = {}
    for i, n in enumerate(samples):
        runs[n] = _reference_saes(seed=i, positions=POSITIONS)
        torch.save(runs[n].state_dict(), folder / f"samples_{n}.pt")
    return runs


def _reference_forward(sae: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference forward, by hand: relu(x W_e^T + b_e), then unit-column decoder."""
    w_e, b_e = sae.encoder[0].weight, sae.encoder[0].bias
    w_d, b_d = sae.decoder.weight, sae.decoder.bias
    c = torch.relu(x @ w_e.T + b_e)
    x_hat = c @ (w_d / w_d.norm(dim=0, keepdim=True).clamp_min(1e-12)).T + b_d
    return x_hat, c


def _assert_matches_reference(sae: SAE[Any], ref: nn.Module) -> None:
    x = torch.randn(3, 5, D_IN) * 4
    x_hat, c = _reference_forward(ref, x)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), c, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sae(x), x_hat, atol=1e-6, rtol=1e-6)


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, dict[int, nn.ModuleDict]]:
    runs = _write_reference_run(tmp_path / "run")
    return tmp_path / "run", runs


# ----------------------------------------------------------------------------- conversion


def test_convert_reproduces_reference_forward(run_dir, tmp_path):
    src, runs = run_dir
    folders = convert_reference_checkpoint(src, tmp_path / "out")
    assert folders == [tmp_path / "out" / pos for pos in POSITIONS]
    for folder, pos in zip(folders, POSITIONS, strict=True):
        sae = SAE.load_from_disk(folder)
        # largest N numerically: 10000, although "samples_900" sorts after it as text
        _assert_matches_reference(sae, runs[10000][pos.replace(".", "-")])


def test_converted_config_records_format_and_provenance(run_dir, tmp_path):
    src, _ = run_dir
    folder = convert_reference_checkpoint(src, tmp_path / "out")[0]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "standard"
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, int(RATIO * D_IN))
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none"
    meta = cfg["metadata"]
    assert meta["hook_name"] == POSITIONS[0]
    assert meta["model_name"] == "gpt2-small"
    assert meta["model_from_pretrained_kwargs"] == REFERENCE_WEIGHT_PROCESSING
    assert meta["reference_model_loader"] == "HookedTransformer.from_pretrained"
    assert meta["reference_samples"] == 10000
    assert meta["reference_checkpoint"] == str(src / "samples_10000.pt")
    assert (meta["context_size"], meta["dataset_path"]) == (1024, "some/tokenized-dataset")
    sae = SAE.load_from_disk(folder)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))


def test_convert_specific_file_and_model_path(tmp_path):
    runs = _write_reference_run(tmp_path / "run", tlens_model_name=None, tlens_model_path="m.pt")
    folders = convert_reference_checkpoint(tmp_path / "run" / "samples_900.pt", tmp_path / "out")
    sae = SAE.load_from_disk(folders[1])
    _assert_matches_reference(sae, runs[900][POSITIONS[1].replace(".", "-")])
    # A model built from a path was never weight-processed by the reference.
    assert sae.cfg.metadata.model_from_pretrained_kwargs == {}
    assert sae.cfg.metadata.reference_samples == 900


def test_substring_positions_and_saes_prefix(tmp_path):
    """A str position is a substring filter (as in the reference); a `saes.` prefix is stripped."""
    runs = _write_reference_run(tmp_path / "run", positions="blocks.", samples=(5,))
    wrapper = nn.Module()
    wrapper.saes = runs[5]
    torch.save(wrapper.state_dict(), tmp_path / "run" / "samples_5.pt")
    folders = convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")
    assert [f.name for f in folders] == POSITIONS


def test_dead_decoder_columns_stay_zero(tmp_path):
    runs = _write_reference_run(tmp_path / "run", samples=(1,))
    with torch.no_grad():
        runs[1][POSITIONS[0].replace(".", "-")].decoder.weight[:, 3] = 0.0
    torch.save(runs[1].state_dict(), tmp_path / "run" / "samples_1.pt")
    sae = SAE.load_from_disk(convert_reference_checkpoint(tmp_path / "run", tmp_path / "o")[0])
    assert torch.all(sae.W_dec[3] == 0)
    _assert_matches_reference(sae, runs[1][POSITIONS[0].replace(".", "-")])


def test_plain_sae_lens_subprocess_loads_converted_folder(run_dir, tmp_path):
    src, runs = run_dir
    folder = convert_reference_checkpoint(src, tmp_path / "out")[0]
    ref = runs[10000][POSITIONS[0].replace(".", "-")]
    x = torch.randn(4, D_IN)
    torch.save({"x": x, "x_hat": _reference_forward(ref, x)[0].detach()}, tmp_path / "io.pt")
    script = f"""
import sys, warnings, torch
warnings.simplefilter("ignore")
from sae_lens import SAE
sae = SAE.load_from_disk({str(folder)!r})
io = torch.load({str(tmp_path / "io.pt")!r})
torch.testing.assert_close(sae(io["x"]).detach(), io["x_hat"], atol=1e-6, rtol=1e-6)
assert not any(m.startswith("sae_e2e_plugin") for m in sys.modules)
print(type(sae).__name__, sae.cfg.metadata.hook_name)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["StandardSAE", POSITIONS[0]]


# ----------------------------------------------------------------------------- converters


def test_disk_loader_converter(run_dir):
    src, runs = run_dir
    for pos in POSITIONS:
        spelled = pos.replace(".", "-") if pos == POSITIONS[1] else pos  # either spelling works
        sae = SAE.load_from_disk(src / spelled, converter=reference_format_disk_loader)
        _assert_matches_reference(sae, runs[10000][pos.replace(".", "-")])
    with pytest.raises(ValueError, match="name one of them"):
        SAE.load_from_disk(src, converter=reference_format_disk_loader)


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub does: blobs by hash, snapshot symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


@pytest.mark.parametrize("subfolder", ["", "runs/e2e_layer6"])
def test_hub_loader_offline_cache(run_dir, tmp_path, monkeypatch, subfolder):
    src, runs = run_dir
    prefix = f"{subfolder}/" if subfolder else ""
    files = {prefix + p.name: p for p in src.iterdir()}
    _fake_hub_cache(tmp_path / "hub", "org/e2e-saes", files)
    # huggingface_hub read these at import; the loader must re-read them at call time.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for pos in POSITIONS:
        sae, cfg_dict, sparsity = SAE.from_pretrained_with_cfg_and_sparsity(
            "org/e2e-saes", prefix + pos, converter=reference_format_loader
        )
        assert sparsity is None
        assert cfg_dict["metadata"]["hook_name"] == pos
        assert cfg_dict["metadata"]["reference_samples"] == 10000
        _assert_matches_reference(sae, runs[10000][pos.replace(".", "-")])
    # A specific checkpoint can be named in the sae_id.
    sae = SAE.from_pretrained(
        "org/e2e-saes", f"{prefix}samples_900.pt/{POSITIONS[0]}", converter=reference_format_loader
    )
    _assert_matches_reference(sae, runs[900][POSITIONS[0].replace(".", "-")])


def test_hub_loader_dtype_override(run_dir, tmp_path, monkeypatch):
    src, _ = run_dir
    _fake_hub_cache(tmp_path / "hub", "org/r", {p.name: p for p in src.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    sae = SAE.from_pretrained(
        "org/r", POSITIONS[0], dtype="bfloat16", converter=reference_format_loader
    )
    assert sae.W_enc.dtype == torch.bfloat16 and sae.cfg.dtype == "bfloat16"


# ----------------------------------------------------------------------------- errors


def test_error_missing_config(run_dir, tmp_path):
    src, _ = run_dir
    (src / "final_config.yaml").unlink()
    with pytest.raises(ValueError, match=r"Missing final_config\.yaml at .*run"):
        convert_reference_checkpoint(src, tmp_path / "out")


def test_error_no_samples_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final_config.yaml").write_text("saes: {}\n")
    (tmp_path / "run" / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"No checkpoint file matching samples_<N>\.pt in .*run"):
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")


def test_error_position_absent_from_weights(tmp_path):
    positions = [*POSITIONS, "blocks.2.hook_resid_pre"]
    _write_reference_run(tmp_path / "run", positions=positions, samples=(1,))
    with pytest.raises(ValueError, match=r"'blocks\.2\.hook_resid_pre' matches none of the SAE"):
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")


def test_error_weights_not_named_by_config(tmp_path):
    _write_reference_run(tmp_path / "run", positions=[POSITIONS[0]], samples=(1,))
    with pytest.raises(ValueError, match=r"holds SAEs at \[.blocks\.1\.hook_resid_post.\], not in"):
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")


def test_error_ratio_mismatch(tmp_path):
    _write_reference_run(tmp_path / "run", samples=(1,))
    cfg = yaml.safe_load((tmp_path / "run" / "final_config.yaml").read_text())
    cfg["saes"]["dict_size_to_input_ratio"] = 60.0
    (tmp_path / "run" / "final_config.yaml").write_text(yaml.safe_dump(cfg))
    message = r"dict_size_to_input_ratio=60\.0 gives d_sae=.*960.*d_sae=64.*ratio 4"
    with pytest.raises(ValueError, match=message):
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")


def test_error_inconsistent_decoder_shape(tmp_path):
    runs = _write_reference_run(tmp_path / "run", samples=(1,))
    state = runs[1].state_dict()
    state["blocks-0-hook_resid_pre.decoder.weight"] = torch.randn(D_IN, 63)
    torch.save(state, tmp_path / "run" / "samples_1.pt")
    message = r"decoder weight has shape \(16, 63\), expected \(16, 64\)"
    with pytest.raises(ValueError, match=message):
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")


def test_error_missing_tensor(tmp_path):
    runs = _write_reference_run(tmp_path / "run", samples=(1,))
    state = runs[1].state_dict()
    del state["blocks-1-hook_resid_post.decoder.bias"]
    torch.save(state, tmp_path / "run" / "samples_1.pt")
    with pytest.raises(ValueError, match=r"lacks \['blocks-1-hook_resid_post\.decoder\.bias'\]"):
        convert_reference_checkpoint(tmp_path / "run", tmp_path / "out")


def test_hand_written_normalisation_matches_torch(run_dir):
    """The hand-written reference normalisation equals F.normalize (the reference's own call)."""
    _, runs = run_dir
    w = runs[10000][POSITIONS[0].replace(".", "-")].decoder.weight
    torch.testing.assert_close(w / w.norm(dim=0, keepdim=True), F.normalize(w, dim=0))


@pytest.mark.filterwarnings("default")
def test_saelens_warns_to_load_model_with_processing(run_dir, tmp_path):
    """SAELens itself tells the user to load the model with the recorded processing flags."""
    src, _ = run_dir
    folder = convert_reference_checkpoint(src, tmp_path / "out")[0]
    with pytest.warns(UserWarning, match="model_from_pretrained_kwargs"):
        SAE.load_from_disk(folder)


def test_single_sae_upload_layout(tmp_path):
    """The reference's HF-upload script: `<name>.pt` (un-nested keys) next to `<name>.yaml`."""
    runs = _write_reference_run(tmp_path / "run", positions=[POSITIONS[0]], samples=(1,))
    ref = runs[1][POSITIONS[0].replace(".", "-")]
    state = {
        "encoder.weight": ref.encoder[0].weight,
        "encoder.bias": ref.encoder[0].bias,
        "decoder.weight": F.normalize(ref.decoder.weight, dim=0),  # that script normalises
        "decoder.bias": ref.decoder.bias,
    }
    (tmp_path / "up").mkdir()
    torch.save(state, tmp_path / "up" / "e2e_layer_0.pt")
    (tmp_path / "run" / "final_config.yaml").rename(tmp_path / "up" / "e2e_layer_0.yaml")
    folders = convert_reference_checkpoint(tmp_path / "up" / "e2e_layer_0.pt", tmp_path / "out")
    assert [f.name for f in folders] == [POSITIONS[0]]
    _assert_matches_reference(SAE.load_from_disk(folders[0]), ref)
