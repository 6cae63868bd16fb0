"""Where each SAE of a run of several starts: SAELens' initialisation or a pretrained SAE."""

from __future__ import annotations

from typing import Any

from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

from sae_e2e_plugin.interop.hub import load_pretrained_sae
from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig


def pretrained_starts(cfg: E2EMultiRunnerConfig[Any]) -> dict[str, TrainingSAE[Any]]:
    """The SAEs ``pretrained_saes`` starts from, each checked against its config and hook (an
    error names the SAE and its ``pretrained_saes`` entry)."""
    saes = {}
    for name, source in cfg.pretrained_saes.items():
        try:
            saes[name] = load_pretrained_sae(
                source,
                cfg.pretrained_sae_ids.get(name),
                cfg.saes[name],
                cfg.hook_names_per_sae[name],
                cfg.device,
                cfg.hook_names_out.get(name),
            )
        except ValueError as error:
            message = str(error).replace("pretrained_sae=", f"pretrained_saes[{name!r}]=")
            raise ValueError(f"SAE {name!r}: {message}") from None
    return saes


def fresh_sae(sae_cfg: TrainingSAEConfig) -> TrainingSAE[Any]:
    """A new training SAE, built from its config as SAELens' runner builds one."""
    return TrainingSAE.from_dict(TrainingSAEConfig.from_dict(sae_cfg.to_dict()).to_dict())
