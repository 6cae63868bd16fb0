"""A config field's value as the type its dataclass declares (``int``, ``float``, ``bool``, ``str``,
``X | None``).

YAML 1.1 (PyYAML) reads ``lr: 1e-3`` as the string "1e-3" and ``training_tokens: 1e6`` as a
float; SAELens does arithmetic on such fields in its own ``__post_init__`` and would fail
there with a ``TypeError``. ``coerce_fields`` converts what a file or flag gave
(``config_from_fields``); ``check_field_types`` refuses what Python code gave that cannot be
meant (``lr="1e-3"``, ``streaming="false"``), so both report the field and the value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from sae_e2e_plugin.training.config.field_shapes import (
    check_dtype,
    coerce_container,
    container_fields,
)

_SCALARS = (bool, int, float, str)
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@functools.cache
def scalar_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (int | float | bool | str, None allowed)}`` for the dataclass' scalar fields.

    Fields of other types (strings, lists, unions such as ``bool | int``) are left out."""
    hints = typing.get_type_hints(cls)
    found: dict[str, tuple[type, bool]] = {}
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name)
        if hint in _SCALARS:
            found[field.name] = (hint, False)
        elif isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) == 1 and args[0] in _SCALARS and len(typing.get_args(hint)) == 2:
                found[field.name] = (args[0], True)
    return found


def coerce_fields(cls: type, fields: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``fields`` (from a file or flags) with each scalar converted to ``cls``' declared type."""
    declared = scalar_fields(cls)
    containers = container_fields(cls)
    return {
        name: coerce(prefix + name, value, *declared[name])
        if name in declared
        else coerce_container(prefix + name, value, containers[name], cls)
        if name in containers
        else value
        for name, value in fields.items()
    }


def coerce(name: str, value: Any, kind: type, optional: bool) -> Any:
    """``value`` as ``kind`` ("1e-3" → 0.001, "1e6" or 1e6 → 1000000 for an int, "yes" → True)."""
    if value is None and optional:
        return None
    if kind is bool:
        return _to_bool(name, value)
    if kind is str:
        # YAML reads `run_name: 2024` as a number; the user meant the text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise _wrong_type(name, value, kind, optional)
        return value
    if isinstance(value, str):
        value = _parse_number(name, value, kind)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, value, kind, optional)
    return float(value) if kind is float else _to_int(name, value)


def check_field_types(obj: Any, prefix: str = "") -> None:
    """Refuse a string, bool or None in a numeric field, anything but a bool, 0 or 1 in a bool
    field and anything but a string in a string field of ``obj``.

    A whole float in an int field (``training_tokens=1e6``) becomes that int; ints in float
    fields stay as given."""
    if isinstance(getattr(obj, "dtype", None), str):
        check_dtype(prefix + "dtype", obj.dtype)
    for name, shape in container_fields(type(obj)).items():
        value = getattr(obj, name)
        shaped = coerce_container(prefix + name, value, shape, type(obj))
        if shaped is not value and shaped != value:
            setattr(obj, name, shaped)
    for name, (kind, optional) in scalar_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if kind is bool:
            # 0 and 1 are what Python code means by False and True; 2 or 0.5 is a mistake.
            if isinstance(value, int) and value in (0, 1):
                setattr(obj, name, bool(value))
                continue
            raise _wrong_type(prefix + name, value, kind, optional)
        if kind is str:
            if not isinstance(value, str):
                raise _wrong_type(prefix + name, value, kind, optional)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(prefix + name, value, kind, optional)
        if kind is int and not isinstance(value, int):
            setattr(obj, name, _to_int(prefix + name, value))


def _parse_number(name: str, text: str, kind: type) -> float:
    # int() first: a float would round ids and counts past 2**53.
    for parse in (int, float):
        try:
            return parse(text.strip())
        except ValueError:
            pass
    raise ValueError(
        f"{name}={text!r} is not a number; {name} takes {_describe(kind)}, "
        f"e.g. {name}={_example(kind)}."
    )


def _to_int(name: str, value: float) -> int:
    if isinstance(value, int):
        return value
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(
            f"{name}={value!r} is not a whole number; {name} takes an int, "
            f"e.g. {name}={math.floor(value) if math.isfinite(value) else 1}."
        )
    return int(value)


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, (str, int)) and text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError(f"{name}={value!r} is not a boolean; use {name}=true or {name}=false.")


def _wrong_type(name: str, value: Any, kind: type, optional: bool) -> ValueError:
    article = "an" if type(value).__name__[0] in "aeiou" else "a"
    given = "is not set (None)" if value is None else f"is {article} {type(value).__name__}"
    if kind is bool:
        return ValueError(
            f"{name}={value!r} {given}, not a boolean; use {name}=True or {name}=False."
        )
    allowed = _describe(kind) + (" or None" if optional else "")
    return ValueError(
        f"{name}={value!r} {given}; {name} takes {allowed}, e.g. {name}={_example(kind)}."
    )


def _describe(kind: type) -> str:
    return {int: "an int", str: "a string"}.get(kind, "a number (float)")


def _example(kind: type) -> str:
    return {int: "1000000", str: "'...'"}.get(kind, "0.001")
