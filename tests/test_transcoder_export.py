"""Exports load in plain SAELens (a fresh process without the plugin) and compute the same output.

One subprocess loads every architecture × skip folder with ``SAE.load_from_disk`` and runs it
on the same inputs; its outputs are compared with the training class in eval mode here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transcoders_common import (
    ARCHITECTURES,
    D_IN,
    D_SAE,
    EXPORTED_CLASS,
    K,
    random_transcoder,
    step_input,
)

from sae_e2e_plugin.transcoders.thresholds import batch_topk_threshold, tokens_where_exact

ALL = [(arch, skip) for arch in ARCHITECTURES for skip in (False, True)]
N_TOKENS = 64

# Runs in a fresh interpreter: plain SAELens, and a check that the plugin was never imported.
LOAD_SCRIPT = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE

root = sys.argv[1]
x = load_file(root + "/x.safetensors")["x"]
report, outputs = {}, {}
for name in json.loads(sys.argv[2]):
    sae = SAE.load_from_disk(root + "/" + name)
    with torch.no_grad():
        outputs[name] = sae(x).contiguous()
    report[name] = {
        "class": type(sae).__name__,
        "hook_name": sae.cfg.metadata.hook_name,
        "hook_name_out": sae.cfg.metadata.hook_name_out,
        "d_out": sae.cfg.d_out,
    }
assert not any(m.startswith("sae_e2e_plugin") for m in sys.modules), "the plugin was imported"
save_file(outputs, root + "/outputs.safetensors")
print(json.dumps(report))
"""


def exported(arch: str, skip: bool, x: torch.Tensor) -> Any:
    """A random transcoder of ``arch``; a top-k one gets the threshold that keeps k·N features
    on ``x`` (what its moving average estimates on data like ``x``)."""
    sae = random_transcoder(arch, skip, seed=len(arch) + skip)
    if arch in ("topk_transcoder", "batchtopk_transcoder"):
        with torch.no_grad():
            _, hidden_pre = sae.encode_with_hidden_pre(x)
            sae.topk_threshold.fill_(batch_topk_threshold(hidden_pre, K).item())
    return sae.eval()


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every export, loaded and run in one fresh process: its report and outputs, and the
    training classes' outputs on the same input."""
    root = tmp_path_factory.mktemp("exports")
    x = torch.randn(N_TOKENS, D_IN, generator=torch.Generator().manual_seed(7))
    save_file({"x": x}, str(root / "x.safetensors"))
    saes, names = {}, []
    for arch, skip in ALL:
        name = f"{arch}-{skip}"
        saes[name] = exported(arch, skip, x)
        saes[name].save_inference_model(
            root / name,
            hook_name="blocks.1.ln2.hook_normalized",
            hook_name_out="blocks.1.hook_mlp_out",
        )
        names.append(name)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(root), json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "x": x,
        "saes": saes,
        "report": json.loads(done.stdout.strip().splitlines()[-1]),
        "outputs": load_file(str(root / "outputs.safetensors")),
        "root": root,
    }


@pytest.mark.parametrize(("arch", "skip"), ALL)
def test_export_loads_in_plain_saelens_as_the_matching_class(
    reloaded: dict[str, Any], arch: str, skip: bool
) -> None:
    report = reloaded["report"][f"{arch}-{skip}"]
    assert report == {
        "class": EXPORTED_CLASS[(arch, skip)],
        "hook_name": "blocks.1.ln2.hook_normalized",
        "hook_name_out": "blocks.1.hook_mlp_out",
        "d_out": reloaded["saes"][f"{arch}-{skip}"].cfg.d_out,
    }


@pytest.mark.parametrize(("arch", "skip"), [(a, s) for a, s in ALL if a != "topk_transcoder"])
def test_export_gives_the_training_classs_output(
    reloaded: dict[str, Any], arch: str, skip: bool
) -> None:
    name = f"{arch}-{skip}"
    sae = reloaded["saes"][name]
    with torch.no_grad():
        expected = sae(reloaded["x"])
    torch.testing.assert_close(reloaded["outputs"][name], expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.5  # a real output, not zeros on both sides


@pytest.mark.parametrize("skip", [False, True])
def test_topk_export_is_exact_on_exactly_the_tokens_the_threshold_separates(
    reloaded: dict[str, Any], skip: bool
) -> None:
    """A per-token top-k is not a JumpReLU: the export equals it on a token if and only if the
    token's k-th largest pre-activation is above the threshold and its (k+1)-th is not."""
    name = f"topk_transcoder-{skip}"
    sae, x = reloaded["saes"][name], reloaded["x"]
    with torch.no_grad():
        expected = sae(x)
        _, hidden_pre = sae.encode_with_hidden_pre(x)
    exact = tokens_where_exact(hidden_pre, K, sae.topk_threshold.item())
    same = torch.isclose(reloaded["outputs"][name], expected, rtol=1e-5, atol=1e-5).all(dim=-1)
    assert torch.equal(same, exact)
    # Both kinds of token occur, so the equivalence above is tested both ways.
    assert 0 < int(exact.sum()) < N_TOKENS


def test_exported_weights_are_the_training_weights_with_norms_folded(
    reloaded: dict[str, Any],
) -> None:
    name = "batchtopk_transcoder-True"
    sae = reloaded["saes"][name]
    weights = load_file(str(reloaded["root"] / name / "sae_weights.safetensors"))
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold"}
    torch.testing.assert_close(weights["W_skip"], sae.W_skip.detach())
    torch.testing.assert_close(weights["W_dec"].norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(weights["threshold"], sae.topk_threshold.float().expand(D_SAE))
    cfg = json.loads((reloaded["root"] / name / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["training_architecture"] == "batchtopk_transcoder"


def test_batch_topk_threshold_keeps_k_per_token_on_average() -> None:
    hidden_pre = torch.randn(50, 30, generator=torch.Generator().manual_seed(3))
    threshold = batch_topk_threshold(hidden_pre, 4)
    assert int((hidden_pre > threshold).sum()) == 4 * 50
    # Fewer positive pre-activations than k·N: every positive one is kept.
    assert batch_topk_threshold(-hidden_pre.abs(), 4).item() == 0.0


def test_topk_threshold_is_learned_while_training_and_exported(tmp_path: Path) -> None:
    sae = random_transcoder("topk_transcoder", False, topk_threshold_lr=0.5)
    x, y = torch.randn(32, D_IN), torch.randn(32, 5)
    for _ in range(3):
        output = sae.training_forward_pass(step_input(sae, x, y))
    _, hidden_pre = sae.encode_with_hidden_pre(x)
    # Three halvings of the distance from 0 towards this batch's threshold.
    expected = 0.875 * batch_topk_threshold(hidden_pre.detach(), K)
    torch.testing.assert_close(sae.topk_threshold, expected, rtol=1e-3, atol=1e-6)
    assert output.metrics["topk_threshold"] is sae.topk_threshold
    sae.save_inference_model(tmp_path)
    threshold = load_file(str(tmp_path / "sae_weights.safetensors"))["threshold"]
    torch.testing.assert_close(threshold, expected.float().expand(D_SAE), rtol=1e-3, atol=1e-6)


def test_the_export_is_written_atomically_and_replaces_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sae = random_transcoder("transcoder", False, seed=3).eval()
    folder = tmp_path / "export"
    sae.save_inference_model(folder, hook_name="blocks.1.ln2.hook_normalized")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # A file elsewhere linked in at cfg.json is left alone: the link is replaced.
    outside = tmp_path / "outside.json"
    outside.write_text("theirs")
    (folder / "cfg.json").unlink()
    (folder / "cfg.json").symlink_to(outside)
    sae.save_inference_model(folder, hook_name="blocks.1.ln2.hook_normalized")
    assert outside.read_text() == "theirs" and not (folder / "cfg.json").is_symlink()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # Killed while the new weights are being put in place: the old files stay whole, and no
    # temporary file is left behind.
    import os

    def killed(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with torch.no_grad():
        sae.W_dec.mul_(2)
    with pytest.raises(KeyboardInterrupt):
        sae.save_inference_model(folder, hook_name="blocks.1.ln2.hook_normalized")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
