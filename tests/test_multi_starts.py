"""Several SAEs per run: a pretrained start per SAE (``pretrained_saes``) and ``compile_sae``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import D_MODEL, make_cfg, tiny_model, token_dataset
from sae_lens import SAE, StandardTrainingSAEConfig
from test_multi_sae import multi_runner, sae_cfg

from sae_e2e_plugin import E2EMultiRunnerConfig, E2ESAETrainingRunner

HOOKS = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}


def pretrained_folder(tmp_path: Path) -> Path:
    """An SAE for hook "a" trained for a few steps and exported in SAELens' format."""
    cfg = make_cfg(
        tmp_path / "pre",
        sae_cfg=sae_cfg(),
        hook_name=HOOKS["a"],
        training_tokens=3 * 4 * 8,
        n_eval_batches=0,
    )
    E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset()).run()
    return tmp_path / "pre" / "output"


def test_each_sae_starts_from_its_pretrained_sae_or_fresh(tmp_path: Path) -> None:
    folder = pretrained_folder(tmp_path)
    loaded = SAE.load_from_disk(str(folder)).state_dict()
    runner = multi_runner(
        tmp_path / "multi",
        {"a": sae_cfg(), "b": sae_cfg()},
        HOOKS,
        "joint",
        pretrained_saes={"a": str(folder)},
        n_eval_batches=0,
    )
    # Step 0: "a" holds the pretrained weights exactly; "b" is SAELens' fresh initialisation.
    start = {
        name: {k: v.clone() for k, v in sae.state_dict().items()}
        for name, sae in runner.saes.items()
    }
    for key, value in loaded.items():
        assert torch.equal(start["a"][key], value), key
    assert not torch.equal(start["b"]["W_enc"], loaded["W_enc"])
    assert runner.saes["a"].cfg.metadata.pretrained_from == str(folder)
    runner.run()
    moved = runner.saes["a"].state_dict()["W_enc"]
    assert not torch.equal(moved, start["a"]["W_enc"])  # it trained on from there


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pretrained_saes": {"c": "x"}}, r"pretrained_saes names \['c'\], which are not among"),
        ({"pretrained_saes": {"a": ""}}, r"pretrained_saes names \['a'\], which have no source"),
        (
            {"pretrained_saes": {"a": "x"}, "pretrained_sae_ids": {"b": "y"}},
            r"pretrained_sae_ids names \['b'\]",
        ),
        ({"pretrained_sae": "x"}, r"pretrained_saes=\{name: source\}"),
    ],
)
def test_bad_pretrained_starts_are_refused_by_name(
    tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        E2EMultiRunnerConfig(
            saes={"a": sae_cfg(), "b": sae_cfg()},  # type: ignore[arg-type]
            hook_names=HOOKS,
            **_base(tmp_path),
            **fields,
        )


def test_a_pretrained_sae_that_does_not_fit_is_named_with_its_sae(tmp_path: Path) -> None:
    folder = pretrained_folder(tmp_path)
    wide = StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64, l1_coefficient=1e-3)
    with pytest.raises(ValueError, match=r"SAE 'a': .*pretrained_saes\['a'\]="):
        multi_runner(
            tmp_path / "multi",
            {"a": wide, "b": sae_cfg()},
            HOOKS,
            "independent",
            pretrained_saes={"a": str(folder)},
        )


def test_compile_sae_compiles_every_saes_training_forward_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compiling needs a C++ compiler and tens of seconds; which functions are compiled is checked.
    compiled: list[Any] = []

    def recording(fn: Any, **kwargs: Any) -> Any:
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording)
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        HOOKS,
        "joint",
        compile_sae=True,
        n_eval_batches=0,
    )
    saes = dict(runner.saes)
    runner.run()
    assert [fn.__self__ for fn in compiled] == [saes["a"], saes["b"]]


def _base(tmp_path: Path) -> dict[str, Any]:
    cfg = make_cfg(tmp_path).to_dict()
    keep = ("model_name", "dataset_path", "is_dataset_tokenized", "context_size", "prepend_bos")
    keep += ("train_batch_size_tokens", "training_tokens", "n_batches_in_buffer", "device")
    return {k: cfg[k] for k in keep}
