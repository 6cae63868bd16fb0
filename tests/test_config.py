"""E2ERunnerConfig: round trip through dicts, and every refused setting's message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import D_MODEL, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import E2ERunnerConfig, E2ESAETrainingRunner


def test_round_trips_through_to_dict_and_from_dict(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        loss="e2e_downstream",
        kl_coefficient=0.5,
        downstream_coefficient=2.5,
        downstream_hooks=["blocks.2.hook_resid_post"],
        local_mse_coefficient=0.1,
        kl_chunk_size=7,
        max_grad_norm=None,
    )
    as_dict = cfg.to_dict()
    json.dumps(as_dict)  # JSON-safe
    again = E2ERunnerConfig.from_dict(json.loads(json.dumps(as_dict)))
    assert again.to_dict() == as_dict
    assert again.loss == "e2e_downstream" and again.downstream_hooks == ["blocks.2.hook_resid_post"]
    assert again.kl_coefficient == 0.5 and again.downstream_coefficient == 2.5
    assert again.local_mse_coefficient == 0.1 and again.kl_chunk_size == 7
    assert again.max_grad_norm is None
    assert isinstance(again, sae_lens.LanguageModelSAERunnerConfig)


def test_every_objective_field_is_documented() -> None:
    import inspect

    source = inspect.getsource(E2ERunnerConfig)
    for name in (
        "loss",
        "kl_coefficient",
        "downstream_coefficient",
        "downstream_hooks",
        "local_mse_coefficient",
        "kl_chunk_size",
        "max_grad_norm",
    ):
        after = source.split(f"    {name}:", 1)[1].splitlines()[1].strip()
        assert after.startswith('"""'), f"{name} has no docstring under it"


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"loss": "e2e_plus"}, r"loss='e2e_plus' is not a known objective.*'e2e'.*register_objective"),
    ({"kl_coefficient": -1.0}, r"kl_coefficient must be a finite number >= 0, got -1.0"),
    ({"downstream_coefficient": float("nan")}, r"downstream_coefficient must be a finite number"),
    (
        {"train_batch_size_tokens": 20},
        r"train_batch_size_tokens=20 is not a multiple of context_size=8.*train_batch_size_tokens=16",
    ),
    (
        {"downstream_hooks": ["blocks.2.hook_resid_post"]},
        r"downstream_hooks=.* loss='e2e' does not use it.*e2e_downstream",
    ),
    ({"loss": "e2e_downstream", "downstream_hooks": []}, r"downstream_hooks=\[\] leaves"),
    (
        {"prefetch_llm_batches": True},
        r"prefetch_llm_batches=True is not supported.*nothing to prefetch.*prefetch_llm_batches=False",
    ),
    (
        {"use_cached_activations": True, "cached_activations_path": "x"},
        r"use_cached_activations=True is not supported",
    ),
    ({"hook_head_index": 1}, r"hook_head_index=1 is not supported"),
    ({"kl_chunk_size": 0}, r"kl_chunk_size must be >= 1, got 0"),
    ({"max_grad_norm": 0.0}, r"max_grad_norm must be > 0 or None, got 0.0"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_bad_settings_raise_a_message_naming_field_value_and_fix(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_cfg(tmp_path, **overrides)


def test_unsupported_normalisation_is_refused(tmp_path: Path) -> None:
    sae_cfg = sae_lens.StandardTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, normalize_activations="covariance_whitening"
    )
    with pytest.raises(
        ValueError,
        match=r"sae.normalize_activations='covariance_whitening' is not supported.*'expected_average_only_in'",
    ):
        make_cfg(tmp_path, sae_cfg=sae_cfg)


def test_sparse_topk_activations_are_refused_by_name_for_one_sae_and_several(
    tmp_path: Path,
) -> None:
    from test_multi_sae import multi_cfg

    sparse = sae_lens.TopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, k=4, use_sparse_activations=True
    )
    with pytest.raises(ValueError, match=r"^sae.use_sparse_activations=True is not supported"):
        make_cfg(tmp_path, sae_cfg=sparse)
    dense = sae_lens.TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4)
    saes = {"a": dense, "b": sparse}
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.1.hook_resid_post"}
    with pytest.raises(ValueError, match=r"saes\['b'\].use_sparse_activations=True is not.*=False"):
        multi_cfg(tmp_path, saes, hooks, "joint")


def test_saelens_sparse_topk_activations_still_fail_in_the_backward_pass() -> None:
    # Why the refusal above exists. When this starts passing, lift it (and train sparse ones).
    sae = sae_lens.TopKTrainingSAE(
        sae_lens.TopKTrainingSAEConfig(d_in=4, d_sae=8, k=2, use_sparse_activations=True)
    )
    out = sae.decode(sae.encode(torch.randn(3, 4)))
    with pytest.raises(NotImplementedError, match="view"):
        out.sum().backward()


def runner_error(tmp_path: Path, **overrides: Any) -> str:
    cfg = make_cfg(tmp_path, **overrides)
    with pytest.raises(ValueError) as info:
        E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())
    return str(info.value)


def test_runner_checks_the_hook_against_the_model(tmp_path: Path) -> None:
    message = runner_error(tmp_path, hook_name="blocks.1.hook_resid_prev")
    assert "hook_name='blocks.1.hook_resid_prev' is not a hook point" in message
    assert "'blocks.1.hook_resid_pre'" in message


def test_runner_checks_the_sae_width(tmp_path: Path) -> None:
    sae_cfg = sae_lens.StandardTrainingSAEConfig(d_in=2 * D_MODEL, d_sae=32)
    message = runner_error(tmp_path, sae_cfg=sae_cfg)
    assert f"sae.d_in is {2 * D_MODEL}" in message and f"width {D_MODEL}" in message


def test_runner_checks_downstream_hooks(tmp_path: Path) -> None:
    message = runner_error(
        tmp_path, loss="e2e_downstream", downstream_hooks=["blocks.0.hook_resid_post"]
    )
    assert "runs at or before hook_name='blocks.1.hook_resid_pre'" in message
    message = runner_error(
        tmp_path, loss="e2e_downstream", downstream_hooks=["blocks.7.hook_resid_post"]
    )
    assert "downstream_hooks='blocks.7.hook_resid_post' is not a hook point" in message


def test_e2e_downstream_at_the_last_block_output_is_refused(tmp_path: Path) -> None:
    message = runner_error(tmp_path, loss="e2e_downstream", hook_name="blocks.2.hook_resid_post")
    assert "has no residual-stream hook after it" in message


def test_runner_needs_an_e2e_config(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    plain = sae_lens.LanguageModelSAERunnerConfig(sae=cfg.sae, dataset_path="x", verbose=False)
    with pytest.raises(ValueError, match="needs an E2ERunnerConfig"):
        E2ESAETrainingRunner(plain)  # type: ignore[arg-type]


def test_fp16_model_on_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"lm_dtype='float16' is not supported on the CPU.*'bfloat16'"
    ):
        make_cfg(tmp_path, lm_dtype="float16")


@pytest.mark.parametrize(
    ("lm_dtype", "cuda", "bf16", "expected"),
    [
        ("auto", False, False, None),  # a CPU: the model as loaded (float32)
        ("auto", True, True, "bfloat16"),  # a CUDA GPU with bf16
        ("auto", True, False, None),  # a CUDA GPU without bf16 (e.g. pre-Ampere)
        ("float32", True, True, "float32"),  # asked for: kept
        (None, True, True, None),
    ],
)
def test_lm_dtype_auto_is_bf16_on_a_cuda_gpu_that_has_it_and_as_loaded_elsewhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lm_dtype: str | None,
    cuda: bool,
    bf16: bool,
    expected: str | None,
) -> None:
    from sae_e2e_plugin.runs.run_setup import model_dtype

    cfg = make_cfg(tmp_path, lm_dtype=lm_dtype)
    assert make_cfg(tmp_path).lm_dtype == "auto"  # the default
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cfg.device = cfg.llm_device = "cuda:0" if cuda else "cpu"
    assert model_dtype(cfg) == expected


def test_the_default_lm_dtype_leaves_a_cpu_model_in_float32(tmp_path: Path) -> None:
    runner = E2ESAETrainingRunner(
        make_cfg(tmp_path), override_model=tiny_model(), override_dataset=token_dataset()
    )
    assert {p.dtype for p in runner.model.parameters()} == {torch.float32}
    bf16 = E2ESAETrainingRunner(
        make_cfg(tmp_path / "b", lm_dtype="bfloat16"),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
