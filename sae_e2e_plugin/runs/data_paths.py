"""A ``dataset_path`` on this machine: a folder or one data file, read here, or refused by name.

Left to SAELens, a local path that does not exist is looked up on the Hugging Face Hub (and
fails there, or offline, with a message about the hub), and a single ``.jsonl`` file is
"Couldn't find any data file". Here a path that names something local (absolute, ``./``,
``~``, or existing) is checked before any model is loaded: it exists; a single file is read
as its format (``.jsonl``/``.json``, ``.txt``, ``.parquet``, ``.csv``); text files are UTF-8
(else the file and the byte offset are named); its first rows hold text. The dataset is then
handed to SAELens as the run's dataset. Hub ids (``org/name``) and built-in corpora pass.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

from sae_e2e_plugin.assets.corpora import is_builtin_dataset

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
FILE_FORMATS[".csv"] = "csv"
"""A single data file's suffix -> the ``datasets`` builder that reads it."""

_TEXT_FORMATS = {"json", "text", "csv"}
_ROWS_CHECKED = 64


def local_dataset(cfg: Any, given: Any = None) -> Any:
    """The dataset ``cfg.dataset_path`` names on this machine (None: not a local path); a
    dataset ``given`` (``override_dataset``) instead, as it is."""
    if given is not None:
        return given
    path_text = str(cfg.dataset_path)
    path = Path(path_text).expanduser()
    looks_local = path_text.startswith(("/", ".", "~")) or path.exists()
    if not looks_local or is_builtin_dataset(path_text):
        return None
    field = f"dataset_path={path_text!r}"
    if not path.exists():
        raise ValueError(
            f"{field} does not exist. Give an existing folder or data file "
            f"({', '.join(FILE_FORMATS)}), a built-in corpus or a Hugging Face dataset id."
        )
    files = _data_files(path, field)
    builder = FILE_FORMATS[files[0].suffix.lower()]
    if builder in _TEXT_FORMATS:
        for file in files:
            check_utf8(file, field)
    from datasets import load_dataset

    try:
        dataset = load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=cfg.streaming
        )
    except Exception as error:  # a malformed row: datasets' message, with the path
        raise ValueError(
            f"{field}: its data cannot be read as {builder} ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else 'no detail'})."
        ) from None
    if not cfg.is_dataset_tokenized:
        check_text_rows(dataset, field)
        check_enough_text(dataset, field, cfg.context_size)
    return dataset


def _data_files(path: Path, field: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise ValueError(
                f"{field} is a {path.suffix or 'suffix-less'} file; a single data file is "
                f"read by its suffix: {', '.join(FILE_FORMATS)}. Rename it, or give a folder."
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_FORMATS)
    if not files:
        raise ValueError(
            f"{field} is a folder with no data file in it ({', '.join(FILE_FORMATS)})."
        )
    kinds = {FILE_FORMATS[f.suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise ValueError(
            f"{field} holds data files of several formats ({', '.join(sorted(kinds))}); keep "
            "one format in the folder."
        )
    return files


def check_utf8(file: Path, field: str, chunk: int = 1 << 20) -> None:
    """Refuse ``file`` if it is not UTF-8, naming the byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(file, "rb") as handle:
        while block := handle.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{field}: {file} is not UTF-8 text (byte {offset + error.start}: "
                    f"{block[error.start : error.start + 1]!r}). Save it as UTF-8."
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{field}: {file} ends inside a UTF-8 character.") from None


def check_text_rows(dataset: Any, field: str) -> None:
    """Refuse data whose first rows have no ``text`` or only empty text."""
    rows = []
    for index, row in enumerate(dataset):
        if index >= _ROWS_CHECKED:
            break
        rows.append(row)
    if not rows:
        raise ValueError(f"{field} has no rows to train on.")
    if "text" not in rows[0]:
        raise ValueError(
            f"{field} has no 'text' column (its columns: {sorted(rows[0])}); untokenized data "
            "needs one, or set is_dataset_tokenized=True for a 'tokens' column."
        )
    empty = [i for i, row in enumerate(rows) if not str(row.get("text") or "").strip()]
    if len(empty) == len(rows):
        raise ValueError(
            f"{field}: every one of its first {len(rows)} rows has empty text; there is nothing "
            "to train on. Check the file's 'text' field."
        )


def check_enough_text(dataset: Any, field: str, context_size: int) -> None:
    """Refuse text too short for one sequence of ``context_size`` tokens (SAELens would loop
    over it for ever). A token is at least one character, so the characters plus one
    separator per row bound the tokens from above; reading stops once they suffice."""
    bound = 0
    for row in dataset:
        bound += len(str(row.get("text") or "")) + 1
        if bound >= context_size:
            return
    raise ValueError(
        f"{field} holds at most {bound} tokens of text, fewer than one sequence of "
        f"context_size={context_size}; give more text or a smaller context_size."
    )
