"""A training transcoder's weights on disk: the inference folder it exports, the shapes it loads.

The export is SAELens' own inference format (``cfg.json`` + ``sae_weights.safetensors``), with
the architecture of one of SAELens' transcoder inference classes, so plain SAELens loads it
without this package. The mapping (training → inference architecture):

========================  ==================  ==========================
training                  skip_connection     SAELens inference class
========================  ==================  ==========================
``transcoder`` (ReLU)     False / True        ``transcoder`` / ``skip_transcoder``
``jumprelu_transcoder``   False / True        ``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``
``topk_transcoder``       False / True        the JumpReLU ones, one learned threshold
``batchtopk_transcoder``  False / True        the JumpReLU ones, one learned threshold
========================  ==================  ==========================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors.torch import save

from sae_e2e_plugin.run_files import atomic_write_bytes, atomic_write_text


def write_inference_folder(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    cfg_dict: dict[str, Any],
    hook_name: str | None,
    hook_name_out: str | None,
) -> tuple[Path, Path]:
    """Write ``state_dict`` and ``cfg_dict`` (with the hook names set in its metadata when
    given) as an SAELens inference folder; returns the weights' and the config's paths."""
    metadata = dict(cfg_dict.get("metadata") or {})
    for field, value in (("hook_name", hook_name), ("hook_name_out", hook_name_out)):
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise ValueError(
                f"{field} must be a non-empty hook name such as "
                f"{'blocks.6.ln2.hook_normalized' if field == 'hook_name' else 'blocks.6.hook_mlp_out'}, "
                f"got {value!r}."
            )
        metadata[field] = value
    # Each file through a temporary sibling renamed into place: a run killed mid-write leaves
    # the old file or the new one, and a link at either name is replaced, never followed.
    weights = save({name: t.contiguous() for name, t in state_dict.items()})
    weights_path = atomic_write_bytes(Path(path) / SAE_WEIGHTS_FILENAME, weights)
    cfg_text = json.dumps({**cfg_dict, "metadata": metadata})
    return weights_path, atomic_write_text(Path(path) / SAE_CFG_FILENAME, cfg_text)


def check_weight_shapes(state_dict: dict[str, torch.Tensor], cfg: Any) -> None:
    """Refuse weights that do not fit ``cfg``, naming the config field that disagrees.

    ``cfg`` is a training transcoder config (``d_in``, ``d_out``, ``d_sae``,
    ``skip_connection``). Tensors that are absent are left to ``load_state_dict``'s own error.
    """
    expected = {
        "W_enc": (("d_in", 0), ("d_sae", 1)),
        "W_dec": (("d_sae", 0), ("d_out", 1)),
        "b_dec": (("d_out", 0),),
        "b_enc": (("d_sae", 0),),
        "W_skip": (("d_out", 0), ("d_in", 1)),
    }
    _check_skip_presence(state_dict, cfg.skip_connection)
    for name, dims in expected.items():
        tensor = state_dict.get(name)
        if tensor is None:
            continue
        if tensor.ndim != len(dims):
            raise ValueError(
                f"the weights' {name} has {tensor.ndim} dimensions (shape "
                f"{tuple(tensor.shape)}), expected {len(dims)}; these are not a transcoder's "
                "weights."
            )
        for field, axis in dims:
            found, wanted = tensor.shape[axis], getattr(cfg, field)
            if found != wanted:
                raise ValueError(
                    f"{field} mismatch: the weights have {field}={found} ({name} of shape "
                    f"{tuple(tensor.shape)}), but the config says {field}={wanted}. Set "
                    f"{field}={found} in the config, or load the weights this config was "
                    "saved with."
                )


def _check_skip_presence(state_dict: dict[str, torch.Tensor], skip_connection: bool) -> None:
    has_skip = "W_skip" in state_dict
    if has_skip != skip_connection:
        raise ValueError(
            f"skip_connection mismatch: the config says skip_connection={skip_connection}, but "
            f"the weights {'have' if has_skip else 'have no'} W_skip. Set "
            f"skip_connection={has_skip}."
        )
