"""A config field whose declared type is a container (tuple, list, mapping, ``bool | list``):
a value from a file or a flag in that shape, or refused by name.

Without this, ``--seqpos_slice 1:`` (YAML reads ``{1: None}``) trained position 0 only,
``--seqpos_slice 1`` failed inside SAELens and ``--model_kwargs foo`` was dropped. A slice
is also taken as text, ``START:STOP[:STEP]``, the way a flag gives it.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

_CHOSEN_ELSEWHERE = frozenset({"loss", "normalize_activations"})
"""Literal-typed fields whose values are checked where they are used: ``loss`` also takes
registered objectives, SAELens' ``normalize_activations`` more values than its type lists."""
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


@functools.cache
def container_fields(cls: type) -> dict[str, str]:
    """``{field: shape}`` for ``cls``' fields of a container type; shape is one of ``slice``
    (``tuple[int | None, ...]``), ``mapping``, ``strings`` (``list[str]``), ``ids_or_bool``
    (``bool | list[int]``), with ``?`` appended when None is allowed."""
    found: dict[str, str] = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        members = [a for a in args if a is not type(None)] if union else [hint]
        origins = {typing.get_origin(m) or m for m in members}
        shape = None
        if members == [tuple[int | None, ...]]:
            shape = "slice"
        elif origins <= {dict, Mapping} and len(members) == 1:
            shape = "mapping"
        elif members == [list[str]]:
            shape = "strings"
        elif set(members) == {bool, list[int]}:
            shape = "ids_or_bool"
        elif name not in _CHOSEN_ELSEWHERE and any(
            typing.get_origin(m) is typing.Literal for m in members
        ):
            shape = "choice"
        if shape is not None:
            found[name] = shape + ("?" if optional else "")
    return found


@functools.cache
def field_choices(cls: type, name: str) -> tuple[tuple[Any, ...], bool]:
    """The values a ``choice`` field takes, and whether an int is allowed besides them
    (``sequence_separator_token: int | 'bos' | 'eos' | 'sep' | None``)."""
    hint = typing.get_type_hints(cls)[name]
    members = typing.get_args(hint) if typing.get_origin(hint) is not typing.Literal else [hint]
    choices: list[Any] = []
    for member in members:
        if typing.get_origin(member) is typing.Literal:
            choices += typing.get_args(member)
    return tuple(choices), int in members


def coerce_container(name: str, value: Any, shape: str, cls: type | None = None) -> Any:
    """``value`` of field ``name`` in ``shape`` (see ``container_fields``; ``cls`` the
    dataclass, for a ``choice`` field's values), or a ``ValueError`` naming the field, the
    value and an example."""
    if value is None and shape.endswith("?"):
        return None
    shape = shape.rstrip("?")
    if shape == "choice":
        if cls is None:
            return value
        choices, ints = field_choices(cls, name.rsplit(".", 1)[-1])
        if value in choices or (ints and isinstance(value, int) and not isinstance(value, bool)):
            return value
        extra = " or a token id (int)" if ints else ""
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}{extra}.")
    if shape == "slice":
        return _slice(name, value)
    if shape == "mapping":
        if not isinstance(value, dict):
            raise ValueError(
                f"{name}={value!r} is not a mapping; {name} takes key: value pairs, e.g. "
                f"{name}: {{key: value}} in a file or --{name}.key value as a flag."
            )
        return value
    if shape == "strings":
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, str):
            return value  # refused by the config's own check, which names the list to give
        raise ValueError(
            f"{name}={value!r} is not a list of names; give e.g. {name}: [blocks.2.hook_resid_post]."
        )
    return _ids_or_bool(name, value)


def _slice(name: str, value: Any) -> tuple[int | None, ...]:
    if isinstance(value, str):
        value = _slice_text(value)
    if (
        not isinstance(value, (list, tuple))
        or not 1 <= len(value) <= 3
        or not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in value)
        or (len(value) == 3 and value[2] is not None and value[2] < 1)
    ):
        raise ValueError(
            f"{name}={value!r} is not a slice of positions; give 1 to 3 ints or null as for "
            f"slice(...), e.g. {name}: [1, null] in a file or --{name} 1: as a flag "
            "(START:STOP[:STEP]; a step, if given, >= 1)."
        )
    return tuple(value)


def _slice_text(text: str) -> Any:
    """``"1:"`` -> ``[1, None]``, ``"::2"`` -> ``[None, None, 2]``; other text is returned as it
    is (and refused by the caller)."""
    if ":" not in text:
        return text
    try:
        return [int(part) if part.strip() else None for part in text.split(":")]
    except ValueError:
        return text


def _ids_or_bool(name: str, value: Any) -> bool | list[int]:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        return list(value)
    raise ValueError(
        f"{name}={value!r} is neither true/false nor a list of token ids; e.g. {name}: true "
        f"(the tokenizer's special tokens) or {name}: [0, 1]."
    )


DTYPES = ("float32", "float64", "float16", "bfloat16")
"""The dtype names SAELens reads (also with a ``torch.`` prefix)."""


def check_dtype(name: str, value: Any) -> None:
    """Refuse a ``dtype`` field that SAELens cannot read, naming the choices."""
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return
    raise ValueError(f"{name}={value!r} is not a dtype; use one of {', '.join(DTYPES)}.")
