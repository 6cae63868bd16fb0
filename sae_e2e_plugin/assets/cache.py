"""Where the built-in assets are cached on disk, and the checks they share."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "SAE_E2E_CACHE"

CACHE_FORMAT = 1
"""Bump when the on-disk layout or the conversion changes, so stale caches are rebuilt."""


def builtin_cache_dir() -> Path:
    """Where converted models and tokenised corpora live.

    ``$SAE_E2E_CACHE`` if set, else ``~/.cache/sae_e2e_plugin``.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    return Path(override) if override else Path.home() / ".cache" / "sae_e2e_plugin"


def check_choice(field: str, value: object, choices: dict[str, str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"{field}={value!r} is not a valid choice; valid choices: {sorted(choices)}"
        )
