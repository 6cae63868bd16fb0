"""The ``sae-e2e`` command line: ``train``, ``eval``, ``sweep``, ``convert`` and ``upload``
(``commands``), with help texts from the config fields' own documentation (``field_help``).
The only part of the package that prints; it shows the package's logs."""

from sae_e2e_plugin.cli.commands import (
    EXIT_INTERRUPTED,
    build_parser,
    main,
    parse_field_flags,
    parse_value,
)
from sae_e2e_plugin.cli.field_help import field_docs

__all__ = [
    "EXIT_INTERRUPTED",
    "build_parser",
    "field_docs",
    "main",
    "parse_field_flags",
    "parse_value",
]
