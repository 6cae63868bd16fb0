"""Local paths at the package's edges: names from files stay inside the folder the user chose,
and the local paths of this machine stay out of what is published.

Two directions, one concern:
- inward, a name read from a file or a flag (a hook name in a checkpoint, an ``sae_id``)
  becomes a folder under a folder the user chose; a crafted name (``/etc``, ``../..``) must
  not move that folder elsewhere;
- outward, a config written next to an SAE (SAELens' ``runner_cfg.json``) records where the
  run kept its files; an upload must not publish those paths.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from sae_e2e_plugin.config_files import without_secrets
from sae_e2e_plugin.run_files import atomic_write_text

PLAIN_HOOK_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
"""A TransformerLens hook name: parts of letters, digits and ``_`` joined by single dots."""

PLAIN_HOOK_NAME_RULE = (
    "a plain hook name: letters, digits and '_' in parts joined by '.', "
    "e.g. 'blocks.6.hook_resid_pre' (no '/', no '..', not an absolute path)"
)

LOCAL_PATH_FIELDS = (
    "output_path",
    "checkpoint_path",
    "resume_from_checkpoint",
    "from_pretrained_path",
    "cached_activations_path",
    "new_cached_activations_path",
    "dataset_path",
    "eval_dataset_path",
    "pretrained_sae",
)
"""Runner-config fields that may name a local file or folder (else a hub id or None)."""


def check_plain_hook_name(name: str, origin: str) -> None:
    """Raise unless ``name`` can be a folder name: a plain hook name (``PLAIN_HOOK_NAME``).

    ``origin`` says where the name was read (key and file), for the message.
    """
    if not PLAIN_HOOK_NAME.fullmatch(name):
        raise ValueError(
            f"{origin} names the SAE position {name!r}, which would become a folder name; "
            f"it must be {PLAIN_HOOK_NAME_RULE}. Use a checkpoint written by a training run."
        )


def path_inside(base: str | Path, relative: str | Path, what: str) -> Path:
    """``base / relative``, refused unless it resolves inside ``base`` (symlinks followed).

    ``what`` names the value that gave ``relative`` (e.g. ``"sae_id='x'"``), for the message.
    """
    base = Path(base)
    path = base / relative
    root = base.resolve()
    if not path.resolve().is_relative_to(root):
        raise ValueError(
            f"{what} would write to {path.resolve()}, outside the chosen folder {root} "
            "(an absolute path, '..', or a link out of it). Choose a name that stays inside "
            "the folder, or remove the link."
        )
    return path


def check_relative_id(value: str, field: str) -> None:
    """Raise unless ``value`` is a relative path of plain parts (``a/b``; no ``..``, ``.``, ``//``).

    Such ids name folders inside a repo or a dry-run folder; anything else would land
    elsewhere, or as an odd path in the repo.
    """
    parts = value.replace("\\", "/").split("/")
    absolute = value.startswith(("/", "\\", "~")) or bool(PureWindowsPath(value).drive)
    if absolute or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"{field}={value!r} is not a relative path inside the repo: use names joined "
            "by '/' with no '..' or '.' parts, no empty parts and no leading '/' or '~', "
            "e.g. 'blocks.6.hook_resid_pre' or 'layer_6/width_16k'."
        )


# ----------------------------------------------------------------------------- outward


def is_local_path(value: str) -> bool:
    """Whether ``value`` names a file or folder of this machine (not a hub id like ``org/x``)."""
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).drive:
        return True
    return value.startswith("~") or ".." in PurePosixPath(value).parts or os.path.exists(value)


def without_local_paths(value: Any, key: str | None = None) -> Any:
    """A copy of a JSON-like config with each local path replaced by its base name and each
    credential by ``config_files.REMOVED`` (``config_files.without_secrets``).

    Every absolute path and every ``~`` path is replaced, under any key; in
    ``LOCAL_PATH_FIELDS`` relative paths that exist here are replaced too (a hub id such as
    ``org/dataset`` stays).
    """
    value = without_secrets(value)
    if isinstance(value, dict):
        return {k: without_local_paths(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if not isinstance(value, str):
        return value
    absolute = PurePosixPath(value).is_absolute() or bool(PureWindowsPath(value).drive)
    absolute = absolute or value.startswith("~")
    if absolute or (key in LOCAL_PATH_FIELDS and is_local_path(value)):
        return PurePosixPath(value.replace("\\", "/")).name
    return value


def write_json_atomically(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON through ``run_files.atomic_write_text`` (never half a file)."""
    return atomic_write_text(path, json.dumps(data))


def scrub_json_file(source: Path, target: Path) -> Path:
    """Write ``source``'s JSON to ``target`` without local paths (``without_local_paths``)."""
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{source} is not valid JSON ({type(error).__name__}: {error}); the file is damaged."
        ) from None
    return write_json_atomically(target, without_local_paths(data))
