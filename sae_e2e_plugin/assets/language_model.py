"""The language model a run or an evaluation names: a built-in one, or whatever SAELens loads."""

from __future__ import annotations

from typing import Any

from sae_lens.load_model import load_model

from sae_e2e_plugin.assets.model import is_builtin_model, load_builtin_hf_model, load_builtin_model
from sae_e2e_plugin.core.model_splice import check_model_class


def load_language_model(
    model_name: str,
    *,
    model_class_name: str = "HookedTransformer",
    device: str | None = "cpu",
    model_from_pretrained_kwargs: dict[str, Any] | None = None,
) -> Any:
    """``model_name`` loaded on ``device``: a built-in model (offline, from the bundled weights)
    when it names one, as a ``HookedTransformer`` or, with
    ``model_class_name="AutoModelForCausalLM"``, as SAELens' ``HookedProxyLM``; else SAELens'
    ``load_model`` with the same arguments a SAELens run uses."""
    check_model_class(model_class_name)
    if is_builtin_model(model_name):
        if model_class_name == "AutoModelForCausalLM":
            return load_builtin_hf_model(model_name, device=device or "cpu")
        return load_builtin_model(model_name, device=device or "cpu")
    return load_model(
        model_class_name,
        model_name,
        device=device,
        model_from_pretrained_kwargs=model_from_pretrained_kwargs or {},
    )
