"""Training transcoders: SAELens' training SAEs that read an MLP's input and write its output.

Docs: ``docs/transcoders.md``. Importing this package registers the training architectures
with SAELens (``transcoders/registry.py``).
"""

from sae_e2e_plugin.transcoders.architectures import (
    BatchTopKTrainingTranscoder,
    JumpReLUTrainingTranscoder,
    StandardTrainingTranscoder,
    TopKTrainingTranscoder,
)
from sae_e2e_plugin.transcoders.config import (
    BatchTopKTrainingTranscoderConfig,
    JumpReLUTrainingTranscoderConfig,
    StandardTrainingTranscoderConfig,
    TopKTrainingTranscoderConfig,
)
from sae_e2e_plugin.transcoders.registry import register_training_transcoders
from sae_e2e_plugin.transcoders.step import TranscoderStepInput, pack_transcoder_batch

register_training_transcoders()

__all__ = [
    "BatchTopKTrainingTranscoder",
    "BatchTopKTrainingTranscoderConfig",
    "JumpReLUTrainingTranscoder",
    "JumpReLUTrainingTranscoderConfig",
    "StandardTrainingTranscoder",
    "StandardTrainingTranscoderConfig",
    "TopKTrainingTranscoder",
    "TopKTrainingTranscoderConfig",
    "TranscoderStepInput",
    "pack_transcoder_batch",
]
