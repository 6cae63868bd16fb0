"""Reference-format checkpoints on the Hugging Face Hub: a converter for ``SAE.from_pretrained``.

Use as ``SAE.from_pretrained(repo_id, sae_id, converter=reference_format_loader)``; the
conversion itself is ``reference``'s. Works offline against a populated hub cache.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, constants, hf_hub_download

from sae_e2e_plugin.interop.reference import (
    CONFIG_FILENAME,
    apply_overrides,
    convert_all,
    latest_samples_file,
    pick_position,
    samples_n,
)


def _hub_cache_and_offline() -> tuple[str, bool]:
    """The hub cache folder and offline flag, read from the environment now.

    ``huggingface_hub`` reads HF_HUB_CACHE / HF_HUB_OFFLINE once, at import; reading them
    again here means a setting made after import (a notebook cell, a test) is still honoured.
    """
    env = os.environ
    hf_home = env.get("HF_HOME")
    cache = (
        env.get("HF_HUB_CACHE")
        or env.get("HUGGINGFACE_HUB_CACHE")
        or (os.path.join(hf_home, "hub") if hf_home else constants.HF_HUB_CACHE)
    )
    flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    offline = flag.upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE
    return os.path.expanduser(os.path.expandvars(cache)), offline


def _hub_samples_file(repo_id: str, subfolder: str, local_dir: Path, offline: bool) -> str:
    """Name of the latest ``samples_<N>.pt`` in ``subfolder`` of a hub repo.

    Online, the repo's file list is authoritative; offline (or if listing fails), the files
    already in the local snapshot are all there is.
    """
    if not offline:
        try:
            files = HfApi().list_repo_files(repo_id)
        except Exception as err:  # network / auth trouble: the cached snapshot is all we have
            warnings.warn(f"Listing {repo_id} failed ({err!r}); using cached files.", stacklevel=3)
        else:
            prefix = f"{subfolder}/" if subfolder else ""
            names = [f[len(prefix) :] for f in files if f.startswith(prefix)]
            where = f"{repo_id}/{subfolder}"
            return latest_samples_file([n for n in names if "/" not in n], where)
    names = [p.name for p in local_dir.glob("samples_*.pt")]
    return latest_samples_file(names, f"{repo_id}/{subfolder} (local cache {local_dir})")


def reference_format_loader(
    repo_id: str,
    folder_name: str,
    device: str = "cpu",
    force_download: bool = False,
    cfg_overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor | None]:
    """SAELens ``converter`` for reference-format checkpoints on the Hugging Face hub.

    Use as ``SAE.from_pretrained(repo_id, sae_id, converter=reference_format_loader)``.
    ``sae_id`` is ``[<subfolder>/[samples_<N>.pt/]]<hook name>``: the repo folder holding
    ``final_config.yaml`` and ``samples_<N>.pt`` (the largest N unless one is named), then the
    SAE position. Works offline against a populated hub cache (``HF_HUB_OFFLINE=1``).
    Returns no log-sparsity (the reference does not store one).
    """
    subfolder, _, hook_name = folder_name.strip("/").rpartition("/")
    samples_name = None
    if samples_n(Path(subfolder)) is not None:
        subfolder, _, samples_name = subfolder.rpartition("/")
    cache_dir, offline = _hub_cache_and_offline()
    fetch = functools.partial(
        hf_hub_download,
        repo_id=repo_id,
        subfolder=subfolder or None,
        cache_dir=cache_dir,
        local_files_only=offline,
        force_download=force_download and not offline,
    )
    config_path = Path(fetch(filename=CONFIG_FILENAME))
    samples_name = samples_name or _hub_samples_file(
        repo_id, subfolder, config_path.parent, offline
    )
    checkpoint = Path(fetch(filename=samples_name))
    source = f"hf://{repo_id}/{subfolder + '/' if subfolder else ''}{samples_name}"
    converted = convert_all(config_path, checkpoint, device, source_name=source)
    cfg_dict, weights = apply_overrides(
        pick_position(converted, hook_name, source), device, cfg_overrides
    )
    return cfg_dict, weights, None
