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

from sae_lens import LoggingConfig
from sae_lens.registry import get_sae_training_class

from sae_e2e_plugin.config_files import load_yaml_file
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig
from sae_e2e_plugin.training.config.field_types import coerce_fields
from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    data = load_yaml_file(path, "--config")
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
    """Build an ``E2ERunnerConfig`` from a nested field mapping, with clear errors for unknown keys
    (an ``E2EMultiRunnerConfig`` where the mapping has ``saes``)."""
    if "saes" in fields:
        return multi_config_from_fields(fields)
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
    sae = _sae_config(dict(fields.pop("sae", None) or {}), "sae.")
    return E2ERunnerConfig(
        sae=sae,
        logger=_logger_config(fields.pop("logger", None)),
        **coerce_fields(E2ERunnerConfig, fields),
    )


def multi_config_from_fields(fields: dict[str, Any]) -> E2EMultiRunnerConfig[Any]:
    """Build an ``E2EMultiRunnerConfig`` from a nested mapping with ``saes: {name: {sae
    fields}}`` and ``hook_names: {name: hook} | hook`` (a YAML file's or flags' fields)."""
    fields = dict(fields)
    saes = fields.pop("saes", None)
    if not isinstance(saes, dict) or not saes:
        raise ValueError(
            f"saes={saes!r} is not a mapping of SAE names to SAE fields; give e.g. "
            "saes: {layer2: {architecture: topk, d_in: 576, d_sae: 4608, k: 32}}."
        )
    if "sae" in fields:
        raise ValueError(
            "sae and saes are both set; with several SAEs give every SAE's fields under "
            "saes.<name> and leave sae out."
        )
    if not isinstance(fields.get("logger") or {}, dict):
        raise ValueError(f"logger={fields['logger']!r} is not a mapping of logger fields.")
    _check_known("", {k: v for k, v in fields.items() if k != "logger"}, E2EMultiRunnerConfig)
    configs = {}
    for name, sae_fields in saes.items():
        if not isinstance(sae_fields, dict):
            raise ValueError(
                f"saes.{name}={sae_fields!r} is not a mapping of SAE fields; give e.g. "
                f"saes.{name}: {{d_in: 576, d_sae: 4608}}."
            )
        configs[str(name)] = _sae_config(dict(sae_fields), f"saes.{name}.")
    return E2EMultiRunnerConfig(
        saes=configs,
        logger=_logger_config(fields.pop("logger", None)),
        **coerce_fields(E2EMultiRunnerConfig, fields),
    )


def _sae_config(sae_fields: dict[str, Any], prefix: str) -> Any:
    architecture = sae_fields.pop("architecture", "standard")
    try:
        sae_cfg_class = get_sae_training_class(architecture)[1]
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"{prefix}architecture={architecture!r} is not a SAELens training architecture "
            f"({error})."
        ) from None
    _check_known(prefix, sae_fields, sae_cfg_class)
    if "metadata" in sae_fields:
        raise ValueError(
            f"{prefix}metadata is written by the run (model, hook, positions, objective); "
            "leave it out of the config."
        )
    if "d_in" not in sae_fields or "d_sae" not in sae_fields:
        raise ValueError(
            f"{prefix}d_in and {prefix}d_sae are required, e.g. --{prefix}d_in 576 "
            f"--{prefix}d_sae 9216."
        )
    # YAML 1.1 reads "lr: 1e-3" as a string and "training_tokens: 1e6" as a float.
    return sae_cfg_class(**coerce_fields(sae_cfg_class, sae_fields, prefix))


def _logger_config(logger_fields: dict[str, Any] | None) -> LoggingConfig:
    logger_fields = dict(logger_fields or {})
    _check_known("logger.", logger_fields, LoggingConfig)
    return LoggingConfig(**coerce_fields(LoggingConfig, logger_fields, "logger."))


def _check_known(prefix: str, fields: dict[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean --{prefix}{close[0]}?" if close else ""
            raise ValueError(f"--{prefix}{name} is not a field of {cls.__name__}{hint}")
