"""The training transcoders in SAELens' training-class registry, so configs round-trip by name.

SAELens resolves ``TrainingSAEConfig.from_dict`` and ``TrainingSAE.load_from_disk`` through
``SAE_TRAINING_CLASS_REGISTRY`` by the ``architecture`` a config records. The transcoders'
names there are ``transcoder``, ``jumprelu_transcoder``, ``topk_transcoder`` and
``batchtopk_transcoder`` (the training registry is separate from the inference one, where
SAELens' ``transcoder`` etc. are the classes the exports load as). SAELens raises when a name
is registered twice, so registering again is skipped when the entry is already ours.
"""

from __future__ import annotations

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class

from sae_e2e_plugin.transcoders.architectures import TRAINING_TRANSCODERS


def register_training_transcoders() -> None:
    """Register every training transcoder with SAELens (idempotent)."""
    for name, (model, config) in TRAINING_TRANSCODERS.items():
        present = SAE_TRAINING_CLASS_REGISTRY.get(name)
        if present is None:
            register_sae_training_class(name, model, config)
        elif present != (model, config):
            raise ValueError(
                f"SAELens already has a training class registered as {name!r} "
                f"({present[0].__name__}); the plugin's {model.__name__} cannot take that "
                "name. Pin sae-lens to a version without it (see pyproject.toml)."
            )
