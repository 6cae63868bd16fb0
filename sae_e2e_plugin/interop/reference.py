"""Pretrained SAEs in the reference implementation's format (ApolloResearch ``e2e_sae``).

A reference run folder holds ``final_config.yaml`` (the training config) and one
``samples_<N>.pt`` per checkpoint (N = training samples seen). Each ``.pt`` is
``torch.save(model.saes.state_dict())`` of an ``nn.ModuleDict`` keyed by hook name
with "." replaced by "-" (module keys may not contain dots), so keys look like
``blocks-6-hook_resid_pre.encoder.0.weight``.

The reference forward at one position is::

    c     = relu(x @ W_e.T + b_e)                       # W_e: [d_sae, d_in]
    x_hat = c @ normalize(W_d, dim=0).T + b_d           # W_d: [d_in, d_sae], NOT unit-norm on disk

which is SAELens' ``"standard"`` architecture with ``W_enc = W_e.T``,
``W_dec = normalize(W_d, dim=0).T`` and ``apply_b_dec_to_input=False``.

Three entry points share one conversion:
- ``convert_reference_checkpoint`` writes SAELens folders that plain SAELens loads;
- ``reference_format_loader`` (``reference_hub``) is a converter for ``SAE.from_pretrained``
  (Hugging Face repos);
- ``reference_format_disk_loader`` is a converter for ``SAE.load_from_disk``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, jaxtyped
from sae_lens import StandardSAEConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes.sae import SAEMetadata
from sae_lens.util import dtype_to_str, str_to_dtype
from safetensors.torch import save as save_safetensors

from sae_e2e_plugin.config_files import load_yaml_file
from sae_e2e_plugin.interop.local_paths import check_plain_hook_name, path_inside
from sae_e2e_plugin.interop.safe_load import load_tensor_file
from sae_e2e_plugin.run_files import atomic_write_bytes, atomic_write_text

CONFIG_FILENAME = "final_config.yaml"
_SAMPLES_RE = re.compile(r"^samples_(\d+)\.pt$")
_PARAM_SUFFIXES = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")

# What `HookedTransformer.from_pretrained` does by default, and what the reference therefore
# trained on when it loaded a model by name. Stored as SAELens' `model_from_pretrained_kwargs`,
# which SAELens passes to `from_pretrained_no_processing`; these flags turn the processing back on.
REFERENCE_WEIGHT_PROCESSING = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": True,
    "fold_value_biases": True,
}

ConvertedSAE = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""(SAELens cfg dict, SAELens state dict) for one SAE position."""


# ----------------------------------------------------------------------------- tensors


@jaxtyped(typechecker=beartype)
def reference_to_saelens_weights(
    encoder_weight: Float[torch.Tensor, "d_sae d_in"],
    encoder_bias: Float[torch.Tensor, " d_sae"],
    decoder_weight: Float[torch.Tensor, "d_in d_sae"],
    decoder_bias: Float[torch.Tensor, " d_in"],
) -> dict[str, torch.Tensor]:
    """Map one reference SAE's parameters onto SAELens' ``StandardSAE`` state dict.

    The reference re-normalises its decoder columns in every forward pass and stores the
    raw, un-normalised matrix; SAELens uses ``W_dec`` as is, so the normalisation is baked in
    here, with the same ``F.normalize`` (same eps, so dead all-zero columns stay zero).
    """
    dict_elements = F.normalize(decoder_weight, dim=0)  # [d_in, d_sae], unit columns
    return {
        "W_enc": encoder_weight.T.contiguous(),  # [d_in, d_sae]
        "b_enc": encoder_bias.clone(),
        "W_dec": dict_elements.T.contiguous(),  # [d_sae, d_in], unit rows
        "b_dec": decoder_bias.clone(),
    }


# ----------------------------------------------------------------------------- files


def samples_n(path: Path) -> int | None:
    """N of a ``samples_<N>.pt`` file name, or None for other names."""
    match = _SAMPLES_RE.match(path.name)
    return int(match.group(1)) if match else None


def latest_samples_file(names: list[str], where: str) -> str:
    """The ``samples_<N>.pt`` name with the largest N (numerically, not lexically)."""
    numbered = [(n, name) for name in names if (n := samples_n(Path(name))) is not None]
    if not numbered:
        raise ValueError(
            f"No checkpoint file matching samples_<N>.pt in {where}. A reference run folder "
            f"holds {CONFIG_FILENAME} and samples_<N>.pt; pass the folder of a finished run "
            "or the path of a specific .pt file."
        )
    return max(numbered)[1]


def _resolve_local_files(src: Path) -> tuple[Path, Path]:
    """(config path, checkpoint path) for a run folder or a specific checkpoint file."""
    if src.is_file():
        checkpoint = src
        # The reference's HF-upload script stores `<name>.pt` next to `<name>.yaml`.
        candidates = [src.parent / CONFIG_FILENAME, src.with_suffix(".yaml")]
        config = next((c for c in candidates if c.is_file()), candidates[0])
    elif src.is_dir():
        config = src / CONFIG_FILENAME
        names = [p.name for p in src.glob("samples_*.pt")]
        checkpoint = src / latest_samples_file(names, str(src))
    else:
        raise ValueError(f"Reference checkpoint path {src} does not exist.")
    if not config.is_file():
        raise ValueError(
            f"Missing {CONFIG_FILENAME} at {config}: the reference stores its training config "
            "next to the samples_<N>.pt files. Copy it from the same training run."
        )
    return config, checkpoint


def _read_config(path: Path) -> dict[str, Any]:
    """The reference training config, checked for the keys the conversion needs."""
    cfg = load_yaml_file(path, "reference config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a YAML mapping (got {type(cfg).__name__}).")
    saes = cfg.get("saes")
    if not isinstance(saes, dict):
        raise ValueError(f"{path}: missing `saes` section; is this an e2e_sae SAE run config?")
    for key in ("sae_positions", "dict_size_to_input_ratio"):
        if saes.get(key) is None:
            raise ValueError(f"{path}: missing `saes.{key}`; add it from the training run.")
    if cfg.get("tlens_model_name") is None and cfg.get("tlens_model_path") is None:
        raise ValueError(f"{path}: neither `tlens_model_name` nor `tlens_model_path` is set.")
    return cfg


def _load_state_dict(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The flat ``saes`` state dict from a reference ``.pt`` file.

    The training script saves ``model.saes.state_dict()`` (flat, no prefix). A state dict of
    the whole ``SAETransformer`` prefixes those keys with ``saes.``; strip it so both work.
    """
    state = load_tensor_file(path, device)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    if any(k.startswith("saes.") for k in state):
        state = {k.removeprefix("saes."): v for k, v in state.items() if k.startswith("saes.")}
    return state


# ----------------------------------------------------------------------------- positions


_UPLOAD_KEYS = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}


def _weight_positions(state: dict[str, torch.Tensor], source: Path) -> list[str]:
    """Hook names present in a reference state dict ("-" back to "."; hook names have no "-").

    Each becomes a folder name in ``convert_reference_checkpoint``, so each must be a plain
    hook name: a crafted key such as ``../../x.encoder.0.weight`` is refused here.
    """
    first_key: dict[str, str] = {}
    for key in state:
        for suffix in _PARAM_SUFFIXES:
            if key.endswith("." + suffix):
                first_key.setdefault(key[: -len(suffix) - 1], key)
    for prefix, key in sorted(first_key.items()):
        check_plain_hook_name(prefix.replace("-", "."), f"State-dict key {key!r} in {source}")
    return sorted(prefix.replace("-", ".") for prefix in first_key)


def _resolve_positions(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], source: Path, config_path: Path
) -> list[str]:
    """Hook names of the SAEs, matched between the config and the weights.

    The reference treats each ``saes.sae_positions`` entry as a substring filter over the
    model's hook names ("hook_resid_pre" means every layer's), so the same rule is applied
    here to the positions found in the weights.
    """
    filters = cfg["saes"]["sae_positions"]
    filters = [filters] if isinstance(filters, str) else list(filters)
    if set(state) == _UPLOAD_KEYS:
        # One un-nested SAE, as the reference's HF-upload script writes it: the config names it.
        if len(filters) != 1:
            raise ValueError(f"{source} holds one SAE but saes.sae_positions is {filters}.")
        check_plain_hook_name(str(filters[0]), f"saes.sae_positions in {config_path}")
        return [str(filters[0])]
    found = _weight_positions(state, source)
    same_run = "The config and the checkpoint must come from the same training run."
    for f in filters:
        if not any(f in name for name in found):
            raise ValueError(
                f"saes.sae_positions entry {f!r} matches none of the SAE positions in "
                f"{source} ({found}). {same_run}"
            )
    unmatched = [name for name in found if not any(f in name for f in filters)]
    if unmatched:
        raise ValueError(f"{source} holds SAEs at {unmatched}, not in {filters}. {same_run}")
    return found


def _position_params(
    state: dict[str, torch.Tensor], hook_name: str, source: Path
) -> tuple[torch.Tensor, ...]:
    """(encoder weight, encoder bias, decoder weight, decoder bias) at one hook."""
    key = hook_name.replace(".", "-")
    names = [f"{key}.{suffix}" for suffix in _PARAM_SUFFIXES]
    if set(state) == _UPLOAD_KEYS:
        names = ["encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"]
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{source} lacks {missing} for the SAE at {hook_name}.")
    return tuple(state[n] for n in names)


def _check_shapes(params: tuple[torch.Tensor, ...], ratio: float, hook_name: str) -> None:
    """Check the four tensors agree with each other and with ``dict_size_to_input_ratio``."""
    enc_w, enc_b, dec_w, dec_b = params
    if enc_w.ndim != 2:
        raise ValueError(f"{hook_name}: encoder.0.weight has shape {tuple(enc_w.shape)}, not 2-D.")
    d_sae, d_in = enc_w.shape
    expected = {"encoder bias": (d_sae,), "decoder weight": (d_in, d_sae), "decoder bias": (d_in,)}
    for (what, shape), t in zip(expected.items(), (enc_b, dec_w, dec_b), strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{hook_name}: {what} has shape {tuple(t.shape)}, expected {shape} from the "
                f"encoder weight [d_sae={d_sae}, d_in={d_in}]; the checkpoint is inconsistent."
            )
    # The reference sizes its dictionary as int(ratio * d_in).
    if int(ratio * d_in) != d_sae:
        raise ValueError(
            f"{hook_name}: saes.dict_size_to_input_ratio={ratio} gives d_sae=int({ratio}*{d_in})="
            f"{int(ratio * d_in)}, but the weights have d_sae={d_sae}. Use the final_config.yaml "
            f"of the run that wrote these weights (ratio {d_sae / d_in:g})."
        )


# ----------------------------------------------------------------------------- conversion


def _metadata(cfg: dict[str, Any], hook_name: str, checkpoint: Path | str) -> SAEMetadata:
    """SAELens metadata: where the SAE sits, which model it expects, and where it came from."""
    by_name = cfg.get("tlens_model_name") is not None
    train_data = cfg.get("train_data") or {}
    return SAEMetadata(
        hook_name=hook_name,
        model_name=cfg["tlens_model_name"] if by_name else str(cfg["tlens_model_path"]),
        model_class_name="HookedTransformer",
        # Named models went through `HookedTransformer.from_pretrained` (processed weights);
        # models from `tlens_model_path` were built with `HookedTransformer(cfg)` and loaded raw.
        model_from_pretrained_kwargs=dict(REFERENCE_WEIGHT_PROCESSING) if by_name else {},
        context_size=train_data.get("n_ctx"),
        dataset_path=train_data.get("dataset_name"),
        sae_lens_training_version=None,  # trained by e2e_sae, not SAELens
        reference_checkpoint=str(checkpoint),
        reference_samples=samples_n(Path(str(checkpoint))),
        reference_model_loader=(
            "HookedTransformer.from_pretrained" if by_name else "HookedTransformer(cfg), raw"
        ),
        reference_dict_size_to_input_ratio=cfg["saes"]["dict_size_to_input_ratio"],
    )


def convert_all(
    config_path: Path, checkpoint: Path, device: str | torch.device, source_name: str | None = None
) -> dict[str, ConvertedSAE]:
    """Every SAE in one reference checkpoint, as SAELens (cfg dict, state dict) by hook name."""
    cfg = _read_config(config_path)
    state = _load_state_dict(checkpoint, device)
    ratio = float(cfg["saes"]["dict_size_to_input_ratio"])
    converted: dict[str, ConvertedSAE] = {}
    for hook_name in _resolve_positions(cfg, state, checkpoint, config_path):
        params = _position_params(state, hook_name, checkpoint)
        _check_shapes(params, ratio, hook_name)
        weights = reference_to_saelens_weights(*params)
        d_in, d_sae = weights["W_enc"].shape
        sae_cfg = StandardSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            dtype=dtype_to_str(weights["W_enc"].dtype),
            device=str(device),
            apply_b_dec_to_input=False,  # the reference encoder does not subtract b_dec
            normalize_activations="none",
            metadata=_metadata(cfg, hook_name, source_name or checkpoint),
        )
        converted[hook_name] = (sae_cfg.to_dict(), weights)
    return converted


def convert_reference_checkpoint(
    src: str | Path, out: str | Path, *, device: str | torch.device = "cpu"
) -> list[Path]:
    """Convert a reference (``e2e_sae``) checkpoint into SAELens inference folders.

    Args:
        src: a reference run folder (``final_config.yaml`` + ``samples_<N>.pt``; the largest N
            is used) or one specific ``.pt`` file (its config is read from the same folder).
        out: parent folder; one sub-folder per SAE position, named after the hook
            (e.g. ``out/blocks.6.hook_resid_pre/``), with ``cfg.json`` and
            ``sae_weights.safetensors`` in SAELens' ``"standard"`` format.
        device: where the checkpoint is loaded (``map_location``).

    Returns:
        The written folders, in hook-name order.

    Raises:
        ValueError: for a position that is not a plain hook name (it names a folder) or whose
            folder would resolve outside ``out`` (e.g. through a link); nothing is written then.
    """
    config_path, checkpoint = _resolve_local_files(Path(src))
    converted = convert_all(config_path, checkpoint, device)
    # Every folder is checked before the first is written, so a refusal leaves no partial output.
    folders = {
        hook_name: path_inside(out, hook_name, f"SAE position {hook_name!r} of {checkpoint}")
        for hook_name in converted
    }
    taken = [
        f
        for f in folders.values()
        if (f / SAE_CFG_FILENAME).exists() or (f / SAE_WEIGHTS_FILENAME).exists()
    ]
    if taken:
        raise ValueError(
            f"{taken[0]} already holds an SAE; converting would replace it. Choose an empty "
            "output folder, or remove that SAE first."
        )
    written = []
    for hook_name, (cfg_dict, weights) in converted.items():
        folder = folders[hook_name]
        # Each file replaced whole (never through a link), cfg.json last: a folder SAELens can
        # load holds complete weights.
        atomic_write_bytes(folder / SAE_WEIGHTS_FILENAME, save_safetensors(weights))
        atomic_write_text(folder / SAE_CFG_FILENAME, json.dumps(cfg_dict, indent=2))
        written.append(folder)
    return written


def pick_position(
    converted: dict[str, ConvertedSAE], hook_name: str | None, where: str
) -> ConvertedSAE:
    """The converted SAE at ``hook_name`` (either spelling), or the only one if None."""
    if hook_name is None:
        if len(converted) != 1:
            raise ValueError(f"{where} holds SAEs at {sorted(converted)}; name one of them.")
        return next(iter(converted.values()))
    hook_name = hook_name.replace("-", ".")
    if hook_name not in converted:
        raise ValueError(f"No SAE at {hook_name!r} in {where}; it holds {sorted(converted)}.")
    return converted[hook_name]


def apply_overrides(
    converted: ConvertedSAE, device: str, cfg_overrides: dict[str, Any] | None
) -> ConvertedSAE:
    """Apply SAELens' config overrides (device, dtype, neuronpedia_id, ...) like its own loaders."""
    cfg_dict, weights = converted
    cfg_dict = {**cfg_dict, "device": device, **(cfg_overrides or {})}
    dtype = str_to_dtype(cfg_dict["dtype"])
    weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    return cfg_dict, weights


# ----------------------------------------------------------------------------- SAELens converters


def reference_format_disk_loader(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> ConvertedSAE:
    """``SAE.load_from_disk(path, converter=reference_format_disk_loader)`` for reference runs.

    ``path`` is ``<run folder or .pt file>/<hook name>`` (e.g. ``run/blocks.6.hook_resid_pre``),
    or just the run folder / ``.pt`` file when it holds a single SAE.
    """
    path = Path(path)
    src, hook_name = (path, None) if path.exists() else (path.parent, path.name)
    config_path, checkpoint = _resolve_local_files(src)
    converted = convert_all(config_path, checkpoint, device)
    return apply_overrides(pick_position(converted, hook_name, str(src)), device, cfg_overrides)
