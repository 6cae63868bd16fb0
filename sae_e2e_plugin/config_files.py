"""Config files read strictly: UTF-8 text, YAML without repeated keys, errors naming the file.

A config (``--config``), a sweep file or a reference run's ``final_config.yaml`` is refused
with its name and what is wrong (no such file, a folder, not UTF-8 at byte N, a YAML syntax
error at line N, a key given twice, a tag that would build a Python object) instead of a
``UnicodeDecodeError`` or a PyYAML traceback. A key given twice is refused rather than letting
the last one win silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives a key twice."""


def _mapping_without_repeats(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *defaults` may be overridden key by key
            continue
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        try:
            repeated = key in seen
        except TypeError:  # an unhashable key: PyYAML's own error names it
            break
        if repeated:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the key {key!r} is given twice (lines {seen[key]} and {line}); keep one",
                key_node.start_mark,
            )
        seen[key] = line
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=True))


_MERGE_TAG = "tag:yaml.org,2002:merge"

_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_repeats,  # type: ignore[arg-type]
)


def read_text_file(path: Path, what: str) -> str:
    """``path``'s text (UTF-8), or a ``ValueError`` naming ``what`` and the file."""
    if not path.exists():
        raise ValueError(f"{what} {path}: no such file.")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give the file itself.")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{what} {path} cannot be read ({error.strerror or error}).") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte {error.start}: {data[error.start : error.start + 1]!r}); "
            "save it as UTF-8."
        ) from None


def load_yaml_text(text: str, source: str) -> Any:
    """``text`` read as YAML (JSON is YAML), refusing repeated keys and Python tags by ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = error.problem or error.context or "not valid YAML"
        raise ValueError(f"{source}{where}: {problem}.") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: not valid YAML ({error}).") from None


def load_yaml_file(path: Path, what: str) -> Any:
    """A YAML/JSON file's content, refused by name when it cannot be read or parsed."""
    return load_yaml_text(read_text_file(path, what), f"{what} {path}")


def load_json_file(path: Path, fix: str = "") -> Any:
    """A JSON file's content, or a ``ValueError`` naming the file, where it is broken and
    ``fix`` (what to do about it)."""
    text = read_text_file(path, "the file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}): it is damaged or truncated.{' ' + fix if fix else ''}"
        ) from None


SECRET_KEY = re.compile(
    r"(use_auth_|hf_|auth_|access_|api_)?token|api_?key|.*(password|passwd|secret|credentials?)",
    re.IGNORECASE,
)
"""Keys whose values are credentials (``token``, ``use_auth_token``, ``hf_token``, ``api_key``):
never written next to an SAE, into a checkpoint or an upload, whatever field holds them."""

REMOVED = "<removed>"
"""What a credential's value is replaced by."""


def without_secrets(value: Any) -> Any:
    """A copy of a JSON-like config with each credential's value (``SECRET_KEY``; not a bool or
    None, e.g. ``use_auth_token: true``) replaced by ``REMOVED``."""
    if isinstance(value, dict):
        return {
            k: REMOVED
            if SECRET_KEY.fullmatch(str(k)) and v not in (None, False, True)
            else without_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value
