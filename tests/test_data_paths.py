"""A local ``dataset_path``: a folder or one data file, read here, or refused naming the path and
the fix before any training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import E2ESAETrainingRunner


def build(tmp_path: Path, dataset_path: Path | str, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(training_tokens=2 * 4 * CONTEXT, n_eval_batches=0)
    cfg = make_cfg(tmp_path, dataset_path=str(dataset_path), **(fields | overrides))
    return E2ESAETrainingRunner(cfg, override_model=tiny_model())


def refusal(tmp_path: Path, dataset_path: Path | str, **overrides: Any) -> str:
    with pytest.raises(ValueError) as error:
        build(tmp_path, dataset_path, **overrides)
    assert not (tmp_path / "output").exists()
    return str(error.value)


def test_a_single_jsonl_file_of_tokens_trains(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    rows = token_dataset(n_rows=32)["tokens"]
    path.write_text("".join(json.dumps({"tokens": row}) + "\n" for row in rows))
    runner = build(tmp_path, path)
    runner.run()
    assert runner.trainer is not None and runner.trainer.n_steps_taken == 2


def test_a_path_that_does_not_exist_is_named(tmp_path: Path) -> None:
    message = refusal(tmp_path, tmp_path / "nowhere")
    assert f"dataset_path={str(tmp_path / 'nowhere')!r} does not exist" in message
    assert "Hugging Face dataset id" in message
    assert "does not exist" in refusal(tmp_path, "./also-nowhere")


def test_a_file_of_another_kind_or_an_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"\x00")
    assert "is a .bin file; a single data file is read by its suffix" in refusal(
        tmp_path, tmp_path / "data.bin"
    )
    (tmp_path / "empty").mkdir()
    assert "is a folder with no data file in it" in refusal(tmp_path, tmp_path / "empty")


def test_a_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"good line\nna\xefve\n")
    message = refusal(tmp_path, path, is_dataset_tokenized=False)
    assert f"{path} is not UTF-8 text (byte 12" in message


def test_rows_of_empty_text_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": ""}\n{"text": "   "}\n')
    message = refusal(tmp_path, path, is_dataset_tokenized=False)
    assert "every one of its first 2 rows has empty text" in message and str(path) in message


def test_a_corpus_too_short_for_one_sequence_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("hi\n")
    message = refusal(tmp_path, path, is_dataset_tokenized=False, context_size=CONTEXT)
    assert f"fewer than one sequence of context_size={CONTEXT}" in message


def test_a_file_without_a_text_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "words here"}\n')
    message = refusal(tmp_path, path, is_dataset_tokenized=False)
    assert "has no 'text' column (its columns: ['body'])" in message


def test_a_local_eval_dataset_path_that_does_not_exist_is_named(tmp_path: Path) -> None:
    path = tmp_path / "tokens.jsonl"
    rows = token_dataset(n_rows=32)["tokens"]
    path.write_text("".join(json.dumps({"tokens": row}) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"dataset_path='.*held-out.jsonl' does not exist"):
        build(
            tmp_path,
            path,
            n_eval_batches=1,
            eval_batch_size_prompts=2,
            eval_dataset_path=str(tmp_path / "held-out.jsonl"),
        )
