"""The help text of ``sae-e2e train``: each config field's own documentation.

SAELens documents its fields in the class's ``Args:`` section, this package in a docstring
under each field; ``field_docs`` reads both, so ``sae-e2e train --help`` lists every field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from typing import Any

# Fields that are derived or internal and make no sense as flags.
HIDDEN_FIELDS = {
    "sae",
    "logger",
    "hook_eval",
    "sae_lens_version",
    "sae_lens_training_version",
    "metadata",
}


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
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def fields_help() -> str:
    from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig

    docs = field_docs(E2ERunnerConfig)
    lines = ["config fields (--<field> VALUE; SAE fields as --sae.<field>, e.g. --sae.d_sae 4096):"]
    for field in dataclasses.fields(E2ERunnerConfig):
        if field.name in HIDDEN_FIELDS or not field.init:
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


def add_model_flags(parser: Any, model_help: str, hook_help: str) -> None:
    """``--model_name``, ``--model_class_name`` and ``--hook_name`` of a command that splices a
    saved SAE (``eval``, ``inspect``): each defaults to the SAE's metadata."""
    parser.add_argument("--model_name", help=model_help)
    parser.add_argument(
        "--model_class_name",
        choices=("HookedTransformer", "AutoModelForCausalLM"),
        help="how to load the model (default: the SAE's metadata, else HookedTransformer)",
    )
    parser.add_argument("--hook_name", help=hook_help)
