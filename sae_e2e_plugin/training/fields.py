"""``E2ERunnerConfig`` from nested field mappings: YAML/JSON files, command-line flags, sweep grids.

A mapping holds config fields by name, SAE fields under ``sae`` (with ``architecture``
choosing SAELens' training config class) and logging fields under ``logger``. Files and
flags are merged (flags win) and built into a config here, so the command line and sweeps
read configs the same way. Unknown keys are refused with the closest field name.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml
from sae_lens import LoggingConfig
from sae_lens.registry import get_sae_training_class

from sae_e2e_plugin.training.config import E2ERunnerConfig
from sae_e2e_plugin.training.field_types import coerce_fields


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    if not path.exists():
        raise ValueError(f"--config {path}: no such file.")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {path}: expected a mapping of config fields, got {type(data).__name__}."
        )
    return data


def nest_dotted(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"sae.k": 8, "lr": 1e-3}`` → ``{"sae": {"k": 8}, "lr": 1e-3}``."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        target = nested
        *parents, last = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return nested


def merge_fields(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it; nested mappings (``sae``, ``logger``) merge key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_fields(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_fields(fields: dict[str, Any]) -> E2ERunnerConfig[Any]:
    """Build an ``E2ERunnerConfig`` from a nested field mapping, with clear errors for unknown keys."""
    fields = dict(fields)
    for group in ("sae", "logger"):
        if not isinstance(fields.get(group) or {}, dict):
            raise ValueError(
                f"{group}={fields[group]!r} is not a mapping of {group} fields; "
                f"give them as {group}: {{...}} in a file or as --{group}.<field> flags."
            )
    _check_known(
        "", {k: v for k, v in fields.items() if k not in ("sae", "logger")}, E2ERunnerConfig
    )
    sae_fields = dict(fields.pop("sae", None) or {})
    architecture = sae_fields.pop("architecture", "standard")
    try:
        sae_cfg_class = get_sae_training_class(architecture)[1]
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"sae.architecture={architecture!r} is not a SAELens training architecture ({error})."
        ) from None
    _check_known("sae.", sae_fields, sae_cfg_class)
    if "d_in" not in sae_fields or "d_sae" not in sae_fields:
        raise ValueError(
            "sae.d_in and sae.d_sae are required, e.g. --sae.d_in 576 --sae.d_sae 9216."
        )
    logger_fields = dict(fields.pop("logger", None) or {})
    _check_known("logger.", logger_fields, LoggingConfig)
    # YAML 1.1 reads "lr: 1e-3" as a string and "training_tokens: 1e6" as a float.
    sae_fields = coerce_fields(sae_cfg_class, sae_fields, "sae.")
    logger_fields = coerce_fields(LoggingConfig, logger_fields, "logger.")
    return E2ERunnerConfig(
        sae=sae_cfg_class(**sae_fields),
        logger=LoggingConfig(**logger_fields),
        **coerce_fields(E2ERunnerConfig, fields),
    )


def _check_known(prefix: str, fields: dict[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean --{prefix}{close[0]}?" if close else ""
            raise ValueError(f"--{prefix}{name} is not a field of {cls.__name__}{hint}")
