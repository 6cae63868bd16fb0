"""Files from elsewhere loaded or refused by name: an SAE folder's ``cfg.json`` and weights, a
``.pt`` state dict.

A damaged or hostile file (truncated, not UTF-8, not JSON, a pickle that needs code to load)
is refused with the file's name and what is wrong in one line, never a raw
``JSONDecodeError``, ``UnpicklingError`` or ``SafetensorError`` traceback. Nothing here
suggests loading with ``weights_only=False``: a file that needs it is not loaded at all.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from safetensors import SafetensorError

_LOAD_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    OSError,
    RuntimeError,
    EOFError,
    AttributeError,
    SafetensorError,
)


def load_sae_folder(
    folder: Path, device: str, what: str, converter: Callable[..., Any] | None = None
) -> SAE[Any]:
    """``SAE.load_from_disk(folder)``, its ``cfg.json`` checked first; any failure a
    ``ValueError`` naming ``what`` (e.g. ``pretrained_sae='...'``) and the file."""
    if converter is None:
        check_sae_cfg(folder / SAE_CFG_FILENAME, what)
    try:
        if converter is None:
            return SAE.load_from_disk(str(folder), device=device)
        return SAE.load_from_disk(str(folder), device=device, converter=converter)
    except _LOAD_ERRORS as error:
        if isinstance(error, ValueError) and what in str(error):
            raise  # already ours
        weights = folder / SAE_WEIGHTS_FILENAME
        cause = _first_line(error)
        raise ValueError(
            f"{what}: the SAE in {folder} cannot be loaded ({type(error).__name__}: {cause}); "
            f"its {SAE_CFG_FILENAME} or {weights.name} is damaged or of another format."
        ) from None


def check_sae_cfg(path: Path, what: str) -> dict[str, Any]:
    """``cfg.json`` as a mapping, or a ``ValueError`` naming it and the problem."""
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist; an SAELens SAE folder holds one.")
    data = path.read_bytes()
    try:
        cfg = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{what}: {path} is not UTF-8 text (byte {error.start}).") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what}: {path} is not valid JSON ({error.msg} at line {error.lineno}, column "
            f"{error.colno}); the file is damaged or truncated."
        ) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: {path} holds a {type(cfg).__name__}, not a mapping of fields.")
    return cfg


def load_tensor_file(path: Path, device: str | torch.device) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, refused by
    name when the file is damaged or needs code to load."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = [p.strip() for p in str(error).split("\n\n") if "GLOBAL" in p]
        what = refused[0].rstrip(".") if refused else _first_line(error)
        raise ValueError(
            f"{path} is not loaded: it holds objects other than tensors and plain containers, "
            f"so loading it could run code ({what}). Use a file of tensors (a state dict)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"{path} cannot be read as a torch file ({type(error).__name__}: "
            f"{_first_line(error)}); it is damaged or truncated."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else "no detail"
    return line if "weights_only" not in line else "it needs code to load"
