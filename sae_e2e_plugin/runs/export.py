"""The exported SAE as a file: read back for the final evaluation, its metadata kept true.

SAELens exports the *inference* form of a training SAE (``save_inference_model``), which is
not always the same function: a ``batchtopk`` or ``matryoshka_batchtopk`` SAE is written as a
JumpReLU SAE with a learned threshold and fires more features per token than the batch
top-k it trained with. So the run's final evaluation reads the SAE back from disk, and the L0
in ``cfg.json``'s metadata (SAELens writes the training SAE's) is replaced by the measured one.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.constants import RUNNER_CFG_FILENAME, SAE_CFG_FILENAME
from sae_lens.saes.sae import TrainingSAE

from sae_e2e_plugin.interop.local_paths import scrub_json_file, write_json_atomically


def load_exported_sae(sae: TrainingSAE[Any], output_path: str | None, device: str) -> SAE[Any]:
    """The inference SAE in ``output_path``, or, without one, as it would be written there."""
    with warnings.catch_warnings():
        # SAELens' advice to load the model with the recorded kwargs; this run's model is loaded.
        warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
        if output_path is not None:
            return SAE.load_from_disk(output_path, device=device)
        with tempfile.TemporaryDirectory() as folder:
            sae.save_inference_model(folder)
            return SAE.load_from_disk(folder, device=device)


def record_exported_l0(output_path: str | Path, l0: float) -> Path:
    """Set ``metadata.l0`` in the exported ``cfg.json`` to ``l0``, replacing the file atomically.

    SAELens records the training SAE's L0 over its last sparsity window (``k`` for batch
    top-k); the file should describe the SAE it holds, as measured in ``eval.json``.
    """
    path = Path(output_path) / SAE_CFG_FILENAME
    cfg = json.loads(path.read_text())
    cfg.setdefault("metadata", {})["l0"] = l0
    return write_json_atomically(path, cfg)


def remove_local_paths(output_path: str | Path) -> Path:
    """Rewrite the exported ``runner_cfg.json`` and ``cfg.json`` without local paths or
    credentials (``interop.local_paths.without_local_paths``): they are what gets uploaded."""
    cfg = Path(output_path) / SAE_CFG_FILENAME
    if cfg.is_file():
        scrub_json_file(cfg, cfg)
    path = Path(output_path) / RUNNER_CFG_FILENAME
    return scrub_json_file(path, path)
