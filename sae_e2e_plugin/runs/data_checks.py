"""The model and the training data checked against the config, once, before the first step.

Without these checks an empty dataset makes SAELens look for ``dataset_path`` on the hub, text
in a ``tokens`` column fails inside torch, a token id outside the vocabulary fails as an
``IndexError`` in the embedding, a context longer than the model's positions fails as a shape
mismatch, and held-out sequences that do not fit in the dataset are silently trained on.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, IterableDataset
from sae_lens.training.activations_store import ActivationsStore

from sae_e2e_plugin.core.model_splice import model_facts

logger = logging.getLogger(__name__)

# The columns SAELens' ActivationsStore reads as token ids, in the order it looks for them.
TOKEN_COLUMNS = ("tokens", "input_ids")


def dataset_label(cfg: Any, overridden: bool) -> str:
    """How messages name the training data: ``override_dataset`` or ``dataset_path='...'``."""
    return "override_dataset" if overridden else f"dataset_path={cfg.dataset_path!r}"


def check_dataset(cfg: Any, dataset: Any, name: str) -> None:
    """Refuse an empty dataset or token columns that are not token ids (no model needed).

    Runs before SAELens builds its ``ActivationsStore``, which reads an empty in-memory
    dataset as "no dataset given" and fails on text in a ``tokens`` column."""
    if dataset is None or cfg.use_chat_formatting:
        return
    if not isinstance(dataset, (Dataset, IterableDataset)):
        raise ValueError(
            f"{name} is a {type(dataset).__name__}; pass a datasets Dataset or IterableDataset "
            "(e.g. Dataset.from_dict({'tokens': [...]}) or datasets.load_dataset(...))."
        )
    first = _first_row(dataset)
    if first is None:
        raise ValueError(f"{name} is empty: it has no rows to train on. Pass a non-empty dataset.")
    column = next((c for c in TOKEN_COLUMNS if c in first), None)
    if column is None:
        if cfg.is_dataset_tokenized and "text" in first:
            raise ValueError(
                f"is_dataset_tokenized=True, but {name} has no {' or '.join(map(repr, TOKEN_COLUMNS))} "
                f"column (its columns: {sorted(first)}); set is_dataset_tokenized=False to "
                "tokenize its 'text' column, or pass a pre-tokenized dataset."
            )
        return
    _check_token_values(first[column], column, name)
    if isinstance(dataset, Dataset):
        _check_row_lengths(dataset, column, name, cfg.context_size)


def check_model_and_data(
    cfg: Any, model: Any, store: ActivationsStore, name: str, builtin: bool
) -> None:
    """Refuse a context longer than the model's, token ids outside its vocabulary and
    held-out sequences that do not fit in the dataset.

    ``builtin``: the data is a built-in corpus, whose held-out sequences come from its own
    eval split (checked where they are read), not from the training stream."""
    facts = model_facts(model)
    if facts.n_ctx is not None and cfg.context_size > facts.n_ctx:
        raise ValueError(
            f"context_size={cfg.context_size} is longer than the model's n_ctx="
            f"{facts.n_ctx} (the positions it was built for); use context_size <= "
            f"{facts.n_ctx}."
        )
    dataset = store.dataset
    if dataset is None or not store.is_dataset_tokenized:
        return
    check_token_range(_token_id_range(dataset, store.tokens_column), facts.d_vocab, name)
    if isinstance(dataset, Dataset) and cfg.eval_dataset_path is None and not builtin:
        _check_held_out_fits(cfg, len(dataset), name)


def check_token_range(id_range: tuple[int, int] | None, d_vocab: int, name: str) -> None:
    """Refuse token ids below 0 or at/above the vocabulary size ``d_vocab``."""
    if id_range is None:
        return
    low, high = id_range
    bad = high if high >= d_vocab else low if low < 0 else None
    if bad is not None:
        raise ValueError(
            f"{name} holds token id {bad}, outside the model's vocabulary of d_vocab={d_vocab} "
            f"(ids 0..{d_vocab - 1}); tokenize it with this model's tokenizer."
        )


def _first_row(dataset: Any) -> dict[str, Any] | None:
    if isinstance(dataset, Dataset):
        return dataset[0] if len(dataset) > 0 else None
    return next(iter(dataset), None)


def _check_token_values(value: Any, column: str, name: str) -> None:
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], str)):
        raise ValueError(
            f"{name}'s {column!r} column holds text ({str(value)[:40]!r}), not token ids. Put "
            "the text in a 'text' column and set is_dataset_tokenized=False, or tokenize it."
        )


def _check_row_lengths(dataset: Dataset, column: str, name: str, context_size: int) -> None:
    # SAELens checks the first row only; a shorter row later fails inside torch.stack.
    rows = _token_lists(dataset, column)
    if rows is None or len(rows) == 0:
        return
    lengths = rows.value_lengths().to_numpy(zero_copy_only=False)
    row = int(np.argmin(lengths))
    if lengths[row] < context_size:
        raise ValueError(
            f"row {row} of {name} has {lengths[row]} tokens, fewer than context_size="
            f"{context_size}; drop rows shorter than {context_size} tokens or lower context_size."
        )


def _token_lists(dataset: Dataset, column: str) -> Any:
    """The column as one pyarrow list array (rows in the dataset's order), or None if the
    column does not hold lists."""
    ids: Any = dataset.with_format("arrow")[column]  # a pyarrow ChunkedArray
    if not (pa.types.is_list(ids.type) or pa.types.is_large_list(ids.type)):
        return None
    return ids.combine_chunks()


def _token_id_range(dataset: Any, column: str) -> tuple[int, int] | None:
    """(smallest, largest) token id: over every row of an in-memory dataset, over the first
    row of a streamed one (reading the whole stream is what training is for)."""
    if isinstance(dataset, Dataset):
        rows = _token_lists(dataset, column)
        ids = np.asarray([] if rows is None else rows.flatten().to_numpy(zero_copy_only=False))
        return (int(ids.min()), int(ids.max())) if ids.size else None
    if isinstance(dataset, IterableDataset):
        first = _first_row(dataset)
        ids = [] if first is None else list(first[column])
        return (int(min(ids)), int(max(ids))) if ids else None
    return None


def _check_held_out_fits(cfg: Any, n_rows: int, name: str) -> None:
    # The runner takes held-out sequences from the start of the training stream (one row
    # each); training reads on from there and wraps around to the start when it runs out.
    held_out = cfg.n_eval_sequences
    if held_out == 0:
        return
    needed = held_out + cfg.sequences_per_batch
    if needed > n_rows:
        raise ValueError(
            f"n_eval_batches × eval_batch_size_prompts = {held_out} held-out sequences plus one "
            f"training batch of {cfg.sequences_per_batch} need {needed} sequences, but {name} "
            f"holds {n_rows}: training would run on the held-out sequences. Lower "
            f"n_eval_batches or eval_batch_size_prompts (at most "
            f"{max(0, n_rows - cfg.sequences_per_batch)} held-out sequences), or set "
            "eval_dataset_path."
        )
    trained = cfg.training_tokens // cfg.context_size
    if held_out + trained > n_rows:
        logger.warning(
            f"{name} holds {n_rows} sequences: after {n_rows - held_out} training sequences "
            f"training wraps around and also trains on the {held_out} held-out sequences. "
            "Set eval_dataset_path for a clean evaluation."
        )
