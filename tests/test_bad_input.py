"""Bad config values and bad data are refused before the first step, naming field, value and fix.

Through the public API (``E2ERunnerConfig``, ``E2ESAETrainingRunner``) and the command line
(``sae-e2e train --config``); values YAML reads as strings are converted, not refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, D_MODEL, VOCAB, make_cfg, tiny_model, token_dataset
from datasets import Dataset, IterableDataset
from sae_lens import LoggingConfig
from sae_lens.registry import get_sae_training_class

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.training.config.fields import config_from_fields, load_config_file

BATCH = 4 * CONTEXT  # make_cfg's train_batch_size_tokens; make_cfg trains 10 batches


def refusal(tmp_path: Path, **overrides: Any) -> str:
    with pytest.raises(ValueError) as info:
        make_cfg(tmp_path, **overrides)
    return str(info.value)


CONFIG_REFUSALS: list[tuple[dict[str, Any], list[str]]] = [
    ({"training_tokens": 0}, ["training_tokens=0", f"training_tokens={BATCH}"]),
    ({"training_tokens": -BATCH}, [f"training_tokens={-BATCH}", "less than one training batch"]),
    ({"training_tokens": 16}, ["training_tokens=16", f"train_batch_size_tokens={BATCH}"]),
    ({"training_tokens": 100}, ["training_tokens=100", "would train 128", "96 or 128"]),
    ({"kl_coefficient": 0.0}, ["kl_coefficient=0", "loss='e2e'", "loss='local'"]),
    (
        {"loss": "e2e_downstream", "downstream_coefficient": 0.0},
        ["downstream_coefficient=0", "loss='e2e_downstream'", "use loss='e2e'"],
    ),
    ({"lr": 0.0}, ["lr must be a finite number > 0", "got 0.0"]),
    ({"lr": -1e-3}, ["lr must be", "got -0.001"]),
    ({"lr": float("nan")}, ["lr must be", "got nan"]),
    ({"lr": float("inf")}, ["lr must be", "got inf"]),
    ({"lr": "1e-3"}, ["lr='1e-3' is a str", "lr=0.001"]),
    ({"lr_warm_up_steps": -1}, ["lr_warm_up_steps must be >= 0", "got -1"]),
    ({"lr_decay_steps": -2}, ["lr_decay_steps must be >= 0", "got -2"]),
    ({"lr_end": -1.0}, ["lr_end must be None or a finite number >= 0", "got -1.0"]),
    ({"adam_beta1": 1.0}, ["adam_beta1 must be in [0, 1)", "got 1.0"]),
    ({"adam_beta2": -0.1}, ["adam_beta2 must be in [0, 1)", "got -0.1"]),
    ({"n_checkpoints": -1}, ["n_checkpoints must be >= 0", "got -1"]),
    ({"context_size": 0}, ["context_size must be >= 1", "got 0"]),
    ({"train_batch_size_tokens": 0}, ["train_batch_size_tokens must be >= 1", "got 0"]),
    ({"store_batch_size_prompts": 0}, ["store_batch_size_prompts must be >= 1", "got 0"]),
    ({"n_batches_in_buffer": 0}, ["n_batches_in_buffer must be >= 1", "got 0"]),
    ({"eval_batch_size_prompts": 0}, ["eval_batch_size_prompts must be None or >= 1", "got 0"]),
    ({"feature_sampling_window": 0}, ["feature_sampling_window must be >= 1", "got 0"]),
    (
        {"logger": LoggingConfig(log_to_wandb=False, wandb_log_frequency=0)},
        ["logger.wandb_log_frequency must be >= 1", "got 0"],
    ),
    ({"lr_scheduler_name": "cosine"}, ["lr_scheduler_name='cosine'", "'cosineannealing'"]),
    (
        {"lr_warm_up_steps": 6, "lr_decay_steps": 6},
        ["lr_warm_up_steps + lr_decay_steps=12", "10 training steps", "raise training_tokens"],
    ),
    ({"n_checkpoints": 11}, ["n_checkpoints=11", "10 training steps"]),
    ({"eval_every_n_steps": 11}, ["eval_every_n_steps=11", "no evaluation would run"]),
    ({"lr_decay_steps": 2, "lr_end": 0.0}, ["lr_decay_steps=2", "lr_end=0.0", "lr_end > 0"]),
    ({"training_tokens": 320.5}, ["training_tokens=320.5 is not a whole number"]),
    ({"seed": "1"}, ["seed='1' is a str", "takes an int"]),
    ({"streaming": "false"}, ["streaming='false' is a str, not a boolean", "streaming=False"]),
    ({"compile_kl": 2}, ["compile_kl=2 is an int, not a boolean", "compile_kl=True"]),
    ({"fused_adam": 0.5}, ["fused_adam=0.5 is a float, not a boolean", "fused_adam=False"]),
    ({"sparse_topk": None}, ["sparse_topk=None is not set (None), not a boolean"]),
    ({"eval_at_end": [True]}, ["eval_at_end=[True] is a list, not a boolean"]),
    ({"device": "gpu"}, ["device='gpu' is not a torch device", "'cuda'"]),
    (
        {"loss": "e2e_downstream", "downstream_hooks": "blocks.2.hook_resid_post"},
        ["downstream_hooks='blocks.2.hook_resid_post' is a string", "['blocks.2.hook_resid_post']"],
    ),
    # Found by a second probe, after the first round of fixes.
    (
        {"hook_name": ["blocks.1.hook_resid_pre"]},
        ["hook_name=['blocks.1.hook_resid_pre'] is a list"],
    ),
    ({"model_name": 3}, ["model_name=3 is an int", "takes a string"]),
    (
        {"train_batch_size_tokens": 3 * CONTEXT + 1},
        [f"train_batch_size_tokens={3 * CONTEXT + 1} is not a multiple of context_size={CONTEXT}"],
    ),
]


def test_zero_and_one_in_a_bool_field_are_false_and_true(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, compile_kl=1, fused_adam=0)
    assert cfg.compile_kl is True and cfg.fused_adam is False


@pytest.mark.parametrize(("overrides", "fragments"), CONFIG_REFUSALS)
def test_bad_config_values_are_refused_by_name(
    tmp_path: Path, overrides: dict[str, Any], fragments: list[str]
) -> None:
    message = refusal(tmp_path, **overrides)
    for fragment in fragments:
        assert fragment in message, message


def sae_cfg(architecture: str, **fields: Any) -> Any:
    return get_sae_training_class(architecture)[1](**({"d_in": D_MODEL, "d_sae": 64} | fields))


SAE_REFUSALS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("standard", {"l1_coefficient": float("nan")}, ["sae.l1_coefficient must be", "got nan"]),
    ("standard", {"l1_coefficient": -1.0}, ["sae.l1_coefficient must be", "got -1.0"]),
    ("standard", {"l1_warm_up_steps": -1}, ["sae.l1_warm_up_steps must be >= 0"]),
    ("standard", {"l1_warm_up_steps": 11}, ["sae.l1_warm_up_steps=11", "10 training steps"]),
    ("standard", {"d_sae": 0}, ["sae.d_sae must be >= 1", "got 0"]),
    ("jumprelu", {"l0_coefficient": float("inf")}, ["sae.l0_coefficient must be", "got inf"]),
    ("jumprelu", {"jumprelu_bandwidth": 0.0}, ["sae.jumprelu_bandwidth must be", "got 0.0"]),
    ("topk", {"aux_loss_coefficient": -0.5}, ["sae.aux_loss_coefficient must be", "got -0.5"]),
    ("topk", {"k": 0}, ["sae.k=0 must be > 0", "sae.d_sae=64"]),
    ("topk", {"k": 65}, ["sae.k=65", "at most sae.d_sae=64"]),
    ("topk", {"k": 2.5}, ["sae.k=2.5 is not a whole number"]),
    ("batchtopk", {"k": 0.0}, ["sae.k=0.0 must be > 0"]),
]


@pytest.mark.parametrize(("architecture", "fields", "fragments"), SAE_REFUSALS)
def test_bad_sae_values_are_refused_by_name(
    tmp_path: Path, architecture: str, fields: dict[str, Any], fragments: list[str]
) -> None:
    message = refusal(tmp_path, sae_cfg=sae_cfg(architecture, **fields))
    for fragment in fragments:
        assert fragment in message, message


def test_an_sae_mapping_instead_of_a_config_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, sae_cfg={"d_in": D_MODEL, "d_sae": 64})
    assert "sae={'d_in': 16, 'd_sae': 64} is a dict" in message
    assert "StandardTrainingSAEConfig" in message


def test_whole_floats_in_int_fields_become_ints(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, training_tokens=320.0, sae_cfg=sae_cfg("topk", k=8.0))
    assert cfg.training_tokens == 320 and type(cfg.training_tokens) is int
    assert cfg.sae.k == 8 and type(cfg.sae.k) is int


# ---- the model and the data, checked by the runner ------------------------------------


def runner_refusal(tmp_path: Path, dataset: Any, **overrides: Any) -> str:
    cfg = make_cfg(tmp_path, **overrides)
    with pytest.raises(ValueError) as info:
        E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=dataset)
    return str(info.value)


def rows(*sequences: list[int], n: int = 64) -> Dataset:
    """``n`` rows cycling through ``sequences``."""
    return Dataset.from_dict({"tokens": [sequences[i % len(sequences)] for i in range(n)]})


GOOD = list(range(CONTEXT))

DATA_REFUSALS: list[tuple[Any, dict[str, Any], list[str]]] = [
    (Dataset.from_dict({"tokens": []}), {}, ["override_dataset is empty"]),
    (
        Dataset.from_dict({"tokens": ["to be or not to be"] * 64}),
        {},
        ["'tokens' column holds text", "'to be or not to be'", "is_dataset_tokenized=False"],
    ),
    (
        Dataset.from_dict({"text": ["to be or not to be"] * 64}),
        {},
        ["is_dataset_tokenized=True", "no 'tokens' or 'input_ids' column", "['text']"],
    ),
    (
        rows(GOOD, GOOD[:-1] + [VOCAB]),
        {},
        [f"token id {VOCAB}", f"d_vocab={VOCAB}", "override_dataset"],
    ),
    (rows(GOOD, [-1] + GOOD[1:]), {}, ["token id -1", f"d_vocab={VOCAB}"]),
    (rows(GOOD, GOOD[:5]), {}, ["row 1 of override_dataset has 5 tokens", "context_size=8"]),
    (
        token_dataset(context=64),
        {"context_size": 64, "train_batch_size_tokens": 256, "training_tokens": 2560},
        ["context_size=64", "n_ctx=32", "context_size <= 32"],
    ),
    (
        token_dataset(n_rows=64),
        {"n_eval_batches": 20},
        [
            "80 held-out sequences",
            "need 84 sequences",
            "holds 64",
            "at most 60",
            "eval_dataset_path",
        ],
    ),
    (
        token_dataset(n_rows=42),
        {},
        ["40 held-out sequences plus one training batch of 4", "holds 42", "n_eval_batches"],
    ),
]


@pytest.mark.parametrize(("dataset", "overrides", "fragments"), DATA_REFUSALS)
def test_bad_data_is_refused_before_training(
    tmp_path: Path, dataset: Any, overrides: dict[str, Any], fragments: list[str]
) -> None:
    message = runner_refusal(tmp_path, dataset, **overrides)
    for fragment in fragments:
        assert fragment in message, message


def streamed(sequences: list[list[int]]) -> IterableDataset:
    return Dataset.from_dict({"tokens": sequences}).to_iterable_dataset()


def test_a_streamed_dataset_is_checked_on_its_first_row(tmp_path: Path) -> None:
    message = runner_refusal(tmp_path, streamed([GOOD[:-1] + [VOCAB]] * 8), n_eval_batches=0)
    assert f"token id {VOCAB}" in message and f"d_vocab={VOCAB}" in message
    empty = IterableDataset.from_generator(lambda: iter([]))
    assert "override_dataset is empty" in runner_refusal(tmp_path, empty, n_eval_batches=0)


def test_a_bad_id_later_in_a_stream_stops_the_step_with_a_message(tmp_path: Path) -> None:
    # The first row passes the up-front check; the second batch holds an id past the vocabulary.
    sequences = [GOOD] * 4 + [GOOD[:-1] + [VOCAB + 3]] * 4
    cfg = make_cfg(tmp_path, n_eval_batches=0, training_tokens=2 * BATCH)
    runner = E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=streamed(sequences)
    )
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 3} .* d_vocab={VOCAB}"):
        runner.run()
    assert runner.trainer is not None and runner.trainer.n_steps_taken == 1


def test_training_that_wraps_onto_the_held_out_sequences_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 40 held-out + 40 training sequences from 64 rows: the last 16 trained are held out.
    with caplog.at_level(logging.WARNING, logger="sae_e2e_plugin"):
        E2ESAETrainingRunner(
            make_cfg(tmp_path), override_model=tiny_model(), override_dataset=token_dataset()
        )
    assert "holds 64 sequences" in caplog.text and "40 held-out sequences" in caplog.text


# ---- the command line: YAML values converted, bad ones refused -------------------------

YAML = """\
loss: e2e
lr: 1e-3
training_tokens: 1e6
train_batch_size_tokens: 32
context_size: 8
dataset_path: x
streaming: "no"
sae: {architecture: topk, d_in: 16, d_sae: 64, k: "8", aux_loss_coefficient: 1e-2}
logger: {log_to_wandb: "false", wandb_log_frequency: 1e1}
"""


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_strings_and_floats_become_the_declared_types(tmp_path: Path) -> None:
    cfg = config_from_fields(load_config_file(write_yaml(tmp_path, YAML)))
    assert type(cfg.lr) is float and cfg.lr == 1e-3
    assert type(cfg.training_tokens) is int and cfg.training_tokens == 1_000_000
    assert cfg.streaming is False
    assert type(cfg.sae.k) is int and cfg.sae.k == 8
    assert cfg.sae.aux_loss_coefficient == 0.01
    assert cfg.logger.log_to_wandb is False
    assert type(cfg.logger.wandb_log_frequency) is int and cfg.logger.wandb_log_frequency == 10
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--print-config"]) == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lr: abc", "lr='abc' is not a number; lr takes a number (float), e.g. lr=0.001."),
        ("lr: null", "lr=None is not set (None); lr takes a number (float)"),
        ("training_tokens: 100.5", "training_tokens=100.5 is not a whole number"),
        ("training_tokens: 1e3", "training_tokens=1000 is not a multiple of"),
        ("streaming: maybe", "streaming='maybe' is not a boolean; use streaming=true"),
        ("kl_coefficient: 0", "kl_coefficient=0 with loss='e2e'"),
        ("sae: 3", "sae=3 is not a mapping of sae fields"),
        ("sae: {architecture: topk, d_in: 16, d_sae: 64, k: many}", "sae.k='many' is not a number"),
        ("logger: {wandb_log_frequency: 0}", "logger.wandb_log_frequency must be >= 1, got 0"),
    ],
)
def test_bad_yaml_values_exit_2_with_the_message(
    tmp_path: Path, line: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = line.split(":")[0]
    kept = [row for row in YAML.splitlines() if not row.startswith(f"{key}:")]
    path = write_yaml(tmp_path, "\n".join([*kept, line]) + "\n")
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-e2e train: error: ") and message in err, err
    assert "Traceback" not in err


def test_flags_are_converted_like_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_yaml(tmp_path, YAML)
    argv = ["train", "--config", str(path), "--training_tokens", "2e6", "--sae.k", "4.0"]
    assert main([*argv, "--print-config"]) == 0
    assert '"training_tokens": 2000000,' in capsys.readouterr().out
    assert main([*argv, "--lr", "0", "--print-config"]) == 2
    assert "lr must be a finite number > 0" in capsys.readouterr().err
