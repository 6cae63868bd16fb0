"""The ``sae-e2e`` command line: ``train``, ``eval`` and ``convert``.

``train`` takes every ``E2ERunnerConfig`` field as a flag (``--loss e2e``,
``--lr 1e-3``), SAE fields as ``--sae.<field>`` (``--sae.architecture topk
--sae.k 32``) and logger fields as ``--logger.<field>``, optionally on top of a
YAML/JSON file (``--config run.yaml``) holding the same keys. Help texts come
from the fields' own documentation.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# Fields that are derived or internal and make no sense as flags.
_HIDDEN_FIELDS = {"sae", "logger", "hook_eval", "sae_lens_version", "sae_lens_training_version", "metadata"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sae-e2e`` and ``python -m sae_e2e_plugin``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "train" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.handler(args, extra) or 0)
    except ValueError as error:
        print(f"sae-e2e {args.command}: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-e2e",
        description="Train and evaluate SAEs end to end (KL of the model's outputs) on SAELens.",
    )
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train an SAE (every E2ERunnerConfig field is a flag; see `sae-e2e train --help`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog=_fields_help(),
    )
    train.add_argument("--config", type=Path, help="YAML or JSON file of config fields; flags override it")
    train.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    train.set_defaults(command="train", handler=_train)

    convert = commands.add_parser(
        "convert", help="convert a reference-format (e2e_sae) checkpoint to SAELens folders"
    )
    convert.add_argument("src", type=Path, help="folder with final_config.yaml and samples_<N>.pt, or one .pt file")
    convert.add_argument("out", type=Path, help="output folder: one SAELens folder per SAE position")
    convert.set_defaults(command="convert", handler=_convert)
    return parser


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.runner import E2ESAETrainingRunner

    fields = load_config_file(args.config) if args.config else {}
    fields = merge_flags(fields, parse_field_flags(extra))
    cfg = config_from_fields(fields)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return 0
    runner = E2ESAETrainingRunner(cfg)
    runner.run()
    if cfg.output_path is not None:
        print(f"saved the SAE (SAELens format) to {cfg.output_path}")
    return 0


def _convert(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.loading import convert_reference_checkpoint

    for folder in convert_reference_checkpoint(args.src, args.out):
        print(folder)
    return 0


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    if not path.exists():
        raise ValueError(f"--config {path}: no such file.")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of config fields, got {type(data).__name__}.")
    return data


def parse_field_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """``--a.b value`` / ``--a.b=value`` pairs → nested dict; values parsed as YAML scalars/lists."""
    fields: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}; flags look like --loss e2e.")
        name, _, value = token[2:].partition("=")
        if not _:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"flag --{name} needs a value.")
            value = tokens[i + 1]
            i += 1
        _set_nested(fields, name.replace("-", "_").split("."), parse_value(value))
        i += 1
    return fields


def parse_value(text: str) -> Any:
    """A flag's text as a number, bool, null, list/mapping, or else the string itself."""
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)", text):
        return float(text)  # YAML 1.1 reads "1e-3" as a string
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merge_flags(base: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in flags.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_flags(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_fields(fields: dict[str, Any]) -> Any:
    """Build an ``E2ERunnerConfig`` from a nested field dict, with clear errors for unknown keys."""
    from sae_lens import LoggingConfig
    from sae_lens.registry import get_sae_training_class

    from sae_e2e_plugin.config import E2ERunnerConfig

    fields = dict(fields)
    sae_fields = dict(fields.pop("sae", None) or {})
    architecture = sae_fields.pop("architecture", "standard")
    try:
        sae_cfg_class = get_sae_training_class(architecture)[1]
    except (KeyError, ValueError) as error:
        raise ValueError(f"sae.architecture={architecture!r} is not a SAELens training architecture ({error}).") from None
    _check_known("sae.", sae_fields, sae_cfg_class)
    if "d_in" not in sae_fields or "d_sae" not in sae_fields:
        raise ValueError("sae.d_in and sae.d_sae are required, e.g. --sae.d_in 576 --sae.d_sae 9216.")
    logger_fields = dict(fields.pop("logger", None) or {})
    _check_known("logger.", logger_fields, LoggingConfig)
    _check_known("", fields, E2ERunnerConfig)
    return E2ERunnerConfig(
        sae=sae_cfg_class(**sae_fields), logger=LoggingConfig(**logger_fields), **fields
    )


def _check_known(prefix: str, fields: dict[str, Any], cls: type) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for name in fields:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean --{prefix}{close[0]}?" if close else ""
            raise ValueError(f"--{prefix}{name} is not a field of {cls.__name__}{hint}")


def _set_nested(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


def field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's documentation: the docstring under it, or the class's ``Args:`` entry."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        docs.update(_args_section(klass.__doc__ or ""))
        docs.update(_attribute_docstrings(klass))
    return docs


def _args_section(doc: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    for match in re.finditer(r"^\s+(\w+) \([^)]*\):\s*(.+)$", doc, flags=re.MULTILINE):
        entries[match.group(1)] = match.group(2).strip()
    return entries


def _attribute_docstrings(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _fields_help() -> str:
    from sae_e2e_plugin.config import E2ERunnerConfig

    docs = field_docs(E2ERunnerConfig)
    lines = ["config fields (--<field> VALUE; SAE fields as --sae.<field>, e.g. --sae.d_sae 4096):"]
    for field in dataclasses.fields(E2ERunnerConfig):
        if field.name in _HIDDEN_FIELDS or not field.init:
            continue
        default = _default_text(field)
        text = docs.get(field.name, "")
        lines.append(f"  --{field.name} (default: {default})")
        if text:
            lines += ["      " + line for line in textwrap.wrap(text, 84)]
    lines.append("")
    lines.append(
        "  --sae.architecture  one of SAELens' training architectures (standard, topk, batchtopk, "
        "jumprelu, gated, matryoshka_batchtopk); --sae.d_in, --sae.d_sae and the architecture's "
        "own fields (l1_coefficient, k, ...)."
    )
    lines.append("  --logger.log_to_wandb, --logger.wandb_project, ...: SAELens' LoggingConfig.")
    return "\n".join(lines)


def _default_text(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "required"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
