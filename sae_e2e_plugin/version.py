"""The installed package's version, read from its distribution metadata (one source: pyproject)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae-e2e-plugin")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
