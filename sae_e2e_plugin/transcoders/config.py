"""The training transcoders' configs: SAELens' training SAE configs plus ``d_out`` and a skip.

Each config subclasses SAELens' training config of the same architecture, so its sparsity
fields keep SAELens' names, defaults and meaning (``l1_coefficient``, ``l0_coefficient``,
``jumprelu_init_threshold``, ``k``, ``topk_threshold_lr``, ...). Added: ``d_out`` (the width of
the MLP output the transcoder writes) and ``skip_connection`` (a learned ``W_skip``, as in
SAELens' ``SkipTranscoder``). ``apply_b_dec_to_input`` defaults to False and must stay so:
``b_dec`` lives in the output space (width ``d_out``), so it cannot be subtracted from the
input.

Every field is checked in ``__post_init__`` (one place), each error naming the field, the
value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
from sae_lens.saes.transcoder import (
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoderConfig,
    TranscoderConfig,
)

# The normalisations a transcoder can fold away. SAELens' run-time ones ("layer_norm",
# "constant_norm_rescale") undo the *input's* statistics on the output, which is another
# space; whitening is estimated and folded for a d_in-wide SAE only.
FOLDABLE_NORMALIZATIONS = ("none", "expected_average_only_in")


@dataclass(kw_only=True)
class TranscoderFields:
    """The fields every training transcoder adds to its SAELens training config."""

    d_out: int
    """Width of the output the transcoder writes (the MLP output at ``hook_name_out``)."""
    skip_connection: bool = False
    """Add a learned linear map of the input, ``x @ W_skip.T`` (``W_skip`` [d_out, d_in], zeros
    at the start, SAELens' ``SkipTranscoder`` layout), to the decoder's output."""
    apply_b_dec_to_input: bool = False
    """Must be False: ``b_dec`` has width ``d_out`` and cannot be subtracted from the input."""

    def __post_init__(self) -> None:
        check_transcoder_fields(self)
        super().__post_init__()  # type: ignore[misc]  # SAELens' config, next in the MRO

    def inference_config_class(self, jumprelu: bool) -> type[SAEConfig]:
        """SAELens' inference config this transcoder is exported as."""
        if jumprelu:
            return (
                JumpReLUSkipTranscoderConfig if self.skip_connection else JumpReLUTranscoderConfig
            )
        return SkipTranscoderConfig if self.skip_connection else TranscoderConfig


def check_transcoder_fields(cfg: TranscoderFields) -> None:
    """Refuse a transcoder config SAELens would build but that cannot work as a transcoder."""
    for name in ("d_in", "d_sae", "d_out"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name} must be a whole number >= 1, got {value!r}; set it to the width of "
                + ("the MLP output (hook_name_out)." if name == "d_out" else f"the {name} space.")
            )
    if not isinstance(cfg.skip_connection, bool):
        raise ValueError(f"skip_connection must be True or False, got {cfg.skip_connection!r}.")
    if cfg.apply_b_dec_to_input:
        raise ValueError(
            "apply_b_dec_to_input=True is not possible for a transcoder: b_dec has width "
            f"d_out={cfg.d_out} and lives in the output space; set apply_b_dec_to_input=False."
        )
    normalization = getattr(cfg, "normalize_activations", "none")
    if normalization not in FOLDABLE_NORMALIZATIONS:
        raise ValueError(
            f"normalize_activations={normalization!r} is not supported for a transcoder: it "
            "would undo the input's statistics on the output, another space. Use one of "
            f"{list(FOLDABLE_NORMALIZATIONS)}."
        )
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError(
            f"reshape_activations={cfg.reshape_activations!r} is not supported for a "  # type: ignore[attr-defined]
            "transcoder (its input and output are flat [tokens, d] rows); use 'none'."
        )


def _check_k(cfg: TopKTrainingSAEConfig) -> None:
    if not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(
            f"k must be > 0 and at most d_sae={cfg.d_sae}, got k={cfg.k}; it is the number "
            "of features kept per token (batch top-k: on average)."
        )


@dataclass(kw_only=True)
class StandardTrainingTranscoderConfig(TranscoderFields, StandardTrainingSAEConfig):
    """ReLU + L1 transcoder: SAELens' ``standard`` training SAE's sparsity term
    (``l1_coefficient`` × Σ_i f_i ‖W_dec,i‖, the p-norm set by ``lp_norm``), averaged over tokens.

    Exported as SAELens' ``transcoder`` (``skip_transcoder`` with ``skip_connection``).
    """

    @classmethod
    def architecture(cls) -> str:
        return "transcoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return self.inference_config_class(jumprelu=False)


@dataclass(kw_only=True)
class JumpReLUTrainingTranscoderConfig(TranscoderFields, JumpReLUTrainingSAEConfig):
    """JumpReLU transcoder with SAELens' ``jumprelu`` sparsity loss (``l0_coefficient``,
    ``jumprelu_sparsity_loss_mode``, ``jumprelu_bandwidth``, ``jumprelu_init_threshold``, ...).

    Exported as SAELens' ``jumprelu_transcoder`` (``jumprelu_skip_transcoder`` with a skip).
    """

    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_transcoder"

    def get_inference_config_class(self) -> type[SAEConfig]:
        return self.inference_config_class(jumprelu=True)


@dataclass(kw_only=True)
class TopKFamilyFields(TranscoderFields):
    """What the top-k and batch top-k transcoders share: ``k`` within ``d_sae``, a threshold
    rate in (0, 1], and the export as a JumpReLU transcoder with the learned threshold."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k(self)  # type: ignore[arg-type]
        _check_rate(self.topk_threshold_lr)  # type: ignore[attr-defined]

    def get_inference_config_class(self) -> type[SAEConfig]:
        return self.inference_config_class(jumprelu=True)


@dataclass(kw_only=True)
class TopKTrainingTranscoderConfig(TopKFamilyFields, TopKTrainingSAEConfig):
    """TopK transcoder: the ``k`` largest pre-activations of each token kept (SAELens' ``topk``:
    ``k``, ``aux_loss_coefficient``, ``rescale_acts_by_decoder_norm``).

    SAELens has no TopK transcoder inference class, so the export is a JumpReLU transcoder
    with one threshold for every feature, learned during training (see
    ``TopKTrainingTranscoder``): it keeps the same number of features *on average*, not
    exactly ``k`` per token.
    """

    topk_threshold_lr: float = 0.01
    """Rate of the moving average that learns the exported JumpReLU threshold (the name and
    default of SAELens' batch top-k field of that role)."""

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


@dataclass(kw_only=True)
class BatchTopKTrainingTranscoderConfig(TopKFamilyFields, BatchTopKTrainingSAEConfig):
    """Batch top-k transcoder: ``k`` features per token on average over the batch (SAELens'
    ``batchtopk``: ``k`` a float, ``topk_threshold_lr``, ``aux_loss_coefficient``, ...).

    Exported, as SAELens exports batch top-k SAEs, as a JumpReLU transcoder whose threshold is
    the learned batch top-k threshold.
    """

    @classmethod
    def architecture(cls) -> str:
        return "batchtopk_transcoder"


def _check_rate(rate: float) -> None:
    if not 0 < rate <= 1:
        raise ValueError(
            f"topk_threshold_lr must be in (0, 1], got {rate}; it is the weight of each "
            "batch in the threshold's moving average (SAELens' default 0.01)."
        )
