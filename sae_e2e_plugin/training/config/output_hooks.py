"""Which SAEs of a config are transcoders, and where they write: ``hook_name_out``.

A transcoder config (one with ``d_out``: ``StandardTrainingTranscoderConfig`` and the others of
``sae_e2e_plugin.transcoders``) reads the MLP's input at ``hook_name`` and replaces the MLP's
output at ``hook_name_out``; an SAE config reads and replaces ``hook_name`` alone. The pairing is
checked here when the config is built, before any model is loaded; the hooks' existence, widths
and order are checked against the model by the splice plan (``core.output_hook``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sae_e2e_plugin.core.output_hook import EXAMPLE

TRANSCODER_ARCHITECTURES = (
    "transcoder",
    "jumprelu_transcoder",
    "topk_transcoder",
    "batchtopk_transcoder",
)
"""The plugin's training transcoder architectures (``sae.architecture``)."""


def check_output_hooks(
    sae_cfgs: Mapping[str, Any],
    hooks_out: Mapping[str, Any],
    field_names: Callable[[str], tuple[str, str]],
) -> None:
    """Refuse a transcoder without an output hook and an SAE with one, by field.

    ``sae_cfgs`` and ``hooks_out`` are keyed by SAE name; ``field_names(name)`` gives the
    config's names for that SAE's output hook and its config (``"hook_name_out"``, ``"sae"``).
    """
    for name, sae_cfg in sae_cfgs.items():
        hook_field, sae_field = field_names(name)
        d_out, hook_out = getattr(sae_cfg, "d_out", None), hooks_out.get(name)
        if hook_out is not None and not isinstance(hook_out, str):
            raise ValueError(
                f"{hook_field}={hook_out!r} is not a hook name; give one string, {EXAMPLE}."
            )
        if d_out is not None and hook_out is None:
            raise ValueError(
                f"{sae_field} is a transcoder ({type(sae_cfg).__name__}, d_out={d_out}), which "
                f"replaces an MLP's output, but {hook_field} is not set. Set {hook_field} to "
                f"the MLP's output hook, {EXAMPLE}."
            )
        if d_out is None and hook_out is not None:
            raise ValueError(
                f"{hook_field}={hook_out!r} is set, but {sae_field} is an SAE "
                f"({type(sae_cfg).__name__}, no d_out), which reads and replaces hook_name "
                f"alone. Leave {hook_field} unset, or use a transcoder architecture "
                f"({', '.join(TRANSCODER_ARCHITECTURES)}) with d_out."
            )


def single_field_names(name: str) -> tuple[str, str]:
    """A one-SAE config's field names (``check_output_hooks``)."""
    return "hook_name_out", "sae"


def multi_field_names(name: str) -> tuple[str, str]:
    """An ``E2EMultiRunnerConfig``'s field names for SAE ``name`` (``check_output_hooks``)."""
    return f"hook_names_out[{name!r}]", f"saes[{name!r}]"
