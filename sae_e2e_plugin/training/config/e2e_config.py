"""``E2ERunnerConfig``: SAELens' runner config plus the ``loss`` flag and its coefficients.

Every SAELens flag keeps its meaning. All validation that needs no model runs when
the config is built: types and ranges of numbers first (``training.config.numbers``, before
SAELens' own ``__post_init__``), then ``validate_e2e_config``. Checks against the model
(hook names, widths, the order of the downstream hooks) happen when the runner has the
model (``sae_e2e_plugin.core.splice.plan_splice``), checks against the data in
``sae_e2e_plugin.runs.data_checks``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens import LanguageModelSAERunnerConfig
from sae_lens.saes.sae import T_TRAINING_SAE_CONFIG

from sae_e2e_plugin.core.model_splice import check_model_class
from sae_e2e_plugin.run_files import CHECKPOINTS_DIRNAME
from sae_e2e_plugin.training.config.numbers import (
    check_coefficient,
    check_e2e_schedule,
    check_numbers,
    check_run_length,
)
from sae_e2e_plugin.training.config.output_hooks import check_output_hooks, single_field_names
from sae_e2e_plugin.training.objectives import resolve_objective

_SAELENS_DEFAULT_CHECKPOINT_PATH = "checkpoints"

LossName = Literal["local", "e2e", "e2e_downstream"]

# Normalisations that happen inside the SAE (its output is back on the model's
# scale) or in the trainer's ActivationScaler, which the splice undoes.
SUPPORTED_NORMALIZATIONS = (
    "none",
    "layer_norm",
    "constant_norm_rescale",
    "expected_average_only_in",
)


@dataclass
class E2ERunnerConfig(LanguageModelSAERunnerConfig[T_TRAINING_SAE_CONFIG]):
    """SAELens' ``LanguageModelSAERunnerConfig`` with an end-to-end objective.

    ``train_batch_size_tokens`` must be a multiple of ``context_size``: a step
    trains on ``train_batch_size_tokens // context_size`` whole sequences.
    """

    model_class_name: str = "HookedTransformer"
    """How SAELens loads the model: "HookedTransformer" (TransformerLens; hooks such as
    "blocks.6.hook_resid_pre") or "AutoModelForCausalLM" (a Hugging Face causal LM in
    SAELens' HookedProxyLM; hooks are module paths such as "model.layers.14", whose output
    the SAE reads and replaces; docs/hf_models.md). Other classes are refused."""

    hook_name_out: str | None = None
    """A transcoder's output hook (``sae`` a transcoder config, with ``d_out``): its output
    replaces the activation here, the MLP's output, while it reads the MLP's input at
    ``hook_name``; the hook must run after ``hook_name`` in the same block, e.g.
    "blocks.6.ln2.hook_normalized" → "blocks.6.hook_mlp_out" (Hugging Face:
    "model.layers.6.post_attention_layernorm" → "model.layers.6.mlp"). The local MSE and the
    local phase measure the output against the MLP's output there (docs/transcoders.md).
    None: an SAE, which reads and replaces ``hook_name``."""

    loss: LossName = "e2e"
    """Training objective. "local": SAELens' reconstruction MSE at the hook.
    "e2e": KL(p_orig ‖ p_patched) of the next-token distributions with the SAE's
    reconstruction spliced in. "e2e_downstream": that KL plus the MSE between the
    patched and clean activations at later layers. Names added with
    ``register_objective`` work too."""

    kl_coefficient: float = 1.0
    """β_kl, the weight of KL(p_orig ‖ p_patched) (summed over the vocabulary,
    averaged over tokens) in "e2e" and "e2e_downstream"."""

    downstream_coefficient: float = 1.0
    """β_ds, the total weight of the downstream MSE terms in "e2e_downstream",
    split evenly over ``downstream_hooks`` (each term is MSE averaged over batch,
    position and d_model, as in the reference implementation)."""

    downstream_hooks: list[str] | None = None
    """Hooks compared in "e2e_downstream". None: every residual-stream hook after
    the SAE's (``blocks.k.hook_resid_post`` for each later block output; on a Hugging Face
    model, each later decoder layer's output, ``model.layers.k``)."""

    local_mse_coefficient: float = 0.0
    """Weight of SAELens' local reconstruction MSE (summed over d_in, averaged over
    tokens) added to "e2e"/"e2e_downstream" for a mixed objective. 0: pure e2e."""

    e2e_fraction: float = 1.0
    """The last ``e2e_fraction`` of ``training_tokens`` trains with ``loss``; every step before
    them trains locally on SAELens' ordinary path (activations from the ``ActivationsStore``
    buffer, the model run only up to the hook, SAETrainer's own step), at the cost of plain
    SAELens local training. One SAE, optimizer and LR schedule over the whole run. The e2e
    phase is ``round(e2e_fraction × steps)`` whole steps (see docs/training.md). 1.0: every
    step end to end. In (0, 1]; < 1 needs an e2e ``loss``."""

    kl_mse_balance: Literal["fixed", "adaptive"] = "fixed"
    """How the e2e phase weighs KL against the local MSE. "fixed": the coefficients
    (``kl_coefficient``, ``local_mse_coefficient``). "adaptive": ``0.5 × (α·KL + MSE)`` with
    ``α = (MSE / KL)`` recomputed (detached) every step, MSE being SAELens' reconstruction MSE
    at the hook, so the loss stays on the MSE scale and a sparsity coefficient tuned for local
    training keeps its meaning (Karvonen 2025). Sparsity, auxiliary and downstream terms are
    added as configured."""

    kl_chunk_size: int = 512
    """Tokens per chunk when computing logits and KL; the full [tokens, vocab]
    logits never exist at once. Smaller uses less memory: a chunk's clean and patched logits
    take 4 (bf16) to 8 (float32) bytes × vocabulary per token, 200–400 MB for 1,024 tokens of a
    49,152-token vocabulary. 512 costs a few percent of the KL's speed against one chunk of
    1,024 on a CPU (docs/performance.md, "Lean layers")."""

    compile_kl: bool = False
    """Fuse the KL's elementwise work on each chunk of logits (two log-softmaxes, the KL and
    its gradient, in float32) with ``torch.compile``: on a CPU a step's KL then costs little
    more than its three vocabulary-sized matrix products. The first step compiles (tens of
    seconds) and needs a C++ compiler on the CPU (a working Triton on GPUs)."""

    clean_run_dtype: Literal["bfloat16", "float16"] | None = None
    """Run the clean run's blocks after the latest SAE's block, and its head, under autocast
    to this dtype. That part only supplies targets (the clean logits; e2e_downstream's
    downstream activations); the SAE's input, the patched run and the loss stay in the model's
    dtype. On a float32 model it saves about a third of the clean run's time where bf16 matrix
    products are fast (GPUs, CPUs with AVX-512-BF16 or AMX), at a small error in the targets
    (docs/performance.md). None: the clean run in the model's dtype. "float16" needs a GPU."""

    checkpoint_blocks: bool = False
    """Recompute the blocks after the SAE during the backward pass instead of keeping their
    activations (activation checkpointing). Cuts a step's peak memory severalfold on long
    contexts (see docs/performance.md) for one more forward of those blocks per step."""

    sparse_topk: bool = True
    """A TopK SAE's e2e step decodes from its k active latents and runs its encoder's backward
    pass over their columns only (``core.sparse_topk``): SAELens' loss terms, summed in
    another order, in a third of the time of SAELens' dense forward and backward (three
    fifths while latents are dead; docs/performance.md). False: SAELens' own
    ``training_forward_pass``. Other architectures, and TopK SAEs with hooks attached or a
    normalisation inside the SAE, always train with SAELens' own; the local phase
    (``e2e_fraction < 1``) is SAELens' own step."""

    fused_adam: bool = True
    """Update each SAE with torch's fused Adam kernel (``training.loop.adam_kernel``): Adam's
    update in one pass over the weights, about 8× faster than the loop SAELens' optimizer runs on
    a CPU, weights equal to rounding. Where torch has no fused kernel for the SAE's device and
    dtype (CPUs before torch 2.4), SAELens' own. False: SAELens' own everywhere."""

    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = "auto"
    """Hold the frozen language model in this dtype. None: as loaded. "bfloat16" runs the
    model's matrix products in bf16 (several times faster on CPUs with AMX and on GPUs)
    while the SAE keeps float32 weights and log-softmax/KL are computed in float32.
    "float16" needs a GPU. "auto": "bfloat16" when the model is on a CUDA GPU that supports
    it, as loaded otherwise (CPUs without AMX emulate bf16; measured cost of bf16 at equal
    SAE weights: KL +0.09%, gradient cosine 0.999, docs/training.md)."""

    pretrained_sae: str | None = None
    """Start from a pretrained SAE: a local SAELens folder, a local reference-format run
    (``final_config.yaml`` + ``samples_<N>.pt``), a SAELens release name, or a hub repo id in
    SAELens format. Its architecture, widths, hook and ``apply_b_dec_to_input`` must match the run."""

    pretrained_sae_id: str | None = None
    """The SAE within ``pretrained_sae``: the release's SAE id, the folder inside the hub repo,
    or the SAE position of a reference-format run."""

    eval_every_n_steps: int = 0
    """Evaluate on held-out tokens every this many steps (printed, logged to wandb when
    it is on), whether or not wandb is on. 0: only at the end (see ``eval_at_end``)."""

    eval_at_end: bool = True
    """Evaluate the final SAE on held-out tokens, print the table and save ``eval.json``
    next to the exported SAE."""

    eval_dataset_path: str | None = None
    """Held-out tokens for evaluation: a built-in corpus name or a Hugging Face dataset.
    None: the built-in corpus' eval split when ``dataset_path`` names one, else the first
    ``n_eval_batches × eval_batch_size_prompts`` sequences of the training data, which
    training then never consumes (they are reserved whether or not evaluation is on, so
    turning it on does not change the training stream)."""

    max_grad_norm: float | None = 1.0
    """Clip the SAE's gradient norm to this value (SAELens hard-codes 1.0). None: no clipping."""

    overwrite_output: bool = False
    """Replace a previous run found in ``output_path`` (its SAE, evaluation, training log and
    default checkpoint folder are deleted first). False: such a folder is refused unless this
    run resumes it, so no run's files are overwritten or mixed with another's."""

    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The ``torch.distributed`` backend when a launcher (``torchrun``) starts several processes.
    "auto": nccl on CUDA, gloo on CPUs. Without a launcher it is unused (docs/distributed.md)."""

    distributed_timeout_s: float = 600.0
    """Seconds a process waits for the others at a collective before it stops with an error
    (a rank that died or hangs). Longer than the slowest checkpoint or evaluation of rank 0."""

    def __post_init__(self) -> None:
        if self.checkpoint_path == _SAELENS_DEFAULT_CHECKPOINT_PATH and self.output_path:
            # SAELens' default is ./checkpoints in the working directory; keep a run's
            # checkpoints inside the folder the user chose for it instead.
            self.checkpoint_path = os.path.join(self.output_path, CHECKPOINTS_DIRNAME)
        # SAELens' own __post_init__ computes with the numbers (lr / 10, a slice of
        # context_size): check them first, so a bad value is named, not failed on inside it.
        check_numbers(self)
        super().__post_init__()
        validate_e2e_config(self)

    @property
    def sequences_per_batch(self) -> int:
        """Whole sequences per training step."""
        return self.train_batch_size_tokens // self.context_size

    @property
    def eval_sequences_per_batch(self) -> int:
        """Sequences per evaluation batch."""
        return self.eval_batch_size_prompts or self.store_batch_size_prompts

    @property
    def n_eval_sequences(self) -> int:
        """Held-out sequences evaluated each time."""
        return self.n_eval_batches * self.eval_sequences_per_batch

    @classmethod
    def from_dict(cls, cfg_dict: dict[str, Any]) -> E2ERunnerConfig[Any]:  # type: ignore[override]
        """Rebuild a config from ``to_dict()`` output (JSON-friendly lists become tuples where needed)."""
        cfg_dict = dict(cfg_dict)
        if isinstance(cfg_dict.get("seqpos_slice"), list):
            cfg_dict["seqpos_slice"] = tuple(cfg_dict["seqpos_slice"])
        for derived in ("tokens_per_buffer",):
            cfg_dict.pop(derived, None)
        return super().from_dict(cfg_dict)  # type: ignore[return-value]


def validate_e2e_config(cfg: E2ERunnerConfig[Any]) -> None:
    """Refuse every setting the e2e splice cannot honour, naming the field and the fix.

    Types and ranges of numbers are checked before this, by ``check_numbers``."""
    # Checks the name and the fields the objective reads; the runner resolves it for the run.
    objective = resolve_objective(cfg)
    for name in ("kl_coefficient", "downstream_coefficient", "local_mse_coefficient"):
        check_coefficient(name, getattr(cfg, name))
    _check_objective_terms(cfg, objective.params)
    # Whole sequences per batch first: the run's length is counted in those batches.
    if cfg.train_batch_size_tokens % cfg.context_size != 0:
        raise ValueError(
            f"train_batch_size_tokens={cfg.train_batch_size_tokens} is not a multiple of "
            f"context_size={cfg.context_size}; end-to-end training consumes whole sequences. "
            f"Use e.g. train_batch_size_tokens={max(1, cfg.sequences_per_batch) * cfg.context_size}."
        )
    check_run_length(cfg)
    check_e2e_schedule(cfg, local=not objective.needs_full_run)
    if cfg.pretrained_sae is not None and cfg.from_pretrained_path is not None:
        raise ValueError(
            f"pretrained_sae={cfg.pretrained_sae!r} and from_pretrained_path="
            f"{cfg.from_pretrained_path!r} are both set; keep one (from_pretrained_path is "
            "SAELens' training-format checkpoint, pretrained_sae any released SAE)."
        )
    if cfg.pretrained_sae_id is not None and cfg.pretrained_sae is None:
        raise ValueError(
            f"pretrained_sae_id={cfg.pretrained_sae_id!r} is set without pretrained_sae; "
            "set pretrained_sae to the release, hub repo or folder it belongs to."
        )
    if cfg.eval_every_n_steps < 0:
        raise ValueError(
            f"eval_every_n_steps must be >= 0 (0: evaluate only at the end), got {cfg.eval_every_n_steps}."
        )
    if cfg.n_eval_batches < 0:
        raise ValueError(f"n_eval_batches must be >= 0, got {cfg.n_eval_batches}.")
    if cfg.kl_chunk_size < 1:
        raise ValueError(f"kl_chunk_size must be >= 1, got {cfg.kl_chunk_size}.")
    if cfg.lm_dtype not in (None, "auto", "float32", "bfloat16", "float16"):
        raise ValueError(
            f"lm_dtype={cfg.lm_dtype!r} is not a dtype for the model; use 'auto', None, "
            "'float32', 'bfloat16' or 'float16'."
        )
    if cfg.lm_dtype == "float16" and str(cfg.llm_device).startswith("cpu"):
        raise ValueError(
            "lm_dtype='float16' is not supported on the CPU (fp16 matrix products are slow "
            "and overflow-prone there); use lm_dtype='bfloat16'."
        )
    _check_clean_run_dtype(cfg, objective)
    if cfg.max_grad_norm is not None and not cfg.max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {cfg.max_grad_norm}.")
    if isinstance(cfg.downstream_hooks, str):
        raise ValueError(
            f"downstream_hooks={cfg.downstream_hooks!r} is a string; give a list of hook names, "
            f"e.g. downstream_hooks=[{cfg.downstream_hooks!r}]."
        )
    _check_devices(cfg)
    if not hasattr(cfg, "hook_names_out"):  # several SAEs: checked per SAE (multi_config)
        check_output_hooks({"sae": cfg.sae}, {"sae": cfg.hook_name_out}, single_field_names)
    if cfg.downstream_hooks is not None:
        if not objective.uses_downstream_hooks:
            raise ValueError(
                f"downstream_hooks={cfg.downstream_hooks} is set but loss={cfg.loss!r} does not "
                "use it. Use loss='e2e_downstream' or leave downstream_hooks unset."
            )
        if len(cfg.downstream_hooks) == 0:
            raise ValueError(
                "downstream_hooks=[] leaves e2e_downstream without downstream terms. "
                "Leave it unset (None) for every later residual-stream hook, or use loss='e2e'."
            )
    _check_unsupported_settings(cfg)


def _check_objective_terms(cfg: E2ERunnerConfig[Any], params: Any) -> None:
    # A weight of 0 switches the objective's defining term off: another objective is meant.
    if getattr(params, "kl_coefficient", None) == 0:
        raise ValueError(
            f"kl_coefficient=0 with loss={cfg.loss!r} trains without the KL term, so the SAE is "
            "not trained end to end; set kl_coefficient > 0, or use loss='local' for "
            "reconstruction-only training."
        )
    if getattr(params, "downstream_coefficient", None) == 0:
        raise ValueError(
            f"downstream_coefficient=0 with loss={cfg.loss!r} trains without the downstream "
            "terms; set downstream_coefficient > 0, or use loss='e2e'."
        )


def _check_clean_run_dtype(cfg: E2ERunnerConfig[Any], objective: Any) -> None:
    value = cfg.clean_run_dtype
    if value is None:
        return
    if not objective.needs_full_run:
        raise ValueError(
            f"clean_run_dtype={value!r} lowers the clean run's targets, but loss={cfg.loss!r} "
            "makes no clean run to the end; leave clean_run_dtype unset."
        )
    if value == "float16" and str(cfg.llm_device).startswith("cpu"):
        raise ValueError(
            "clean_run_dtype='float16' is not supported on the CPU (fp16 matrix products are "
            "slow there); use clean_run_dtype='bfloat16'."
        )


def _check_devices(cfg: E2ERunnerConfig[Any]) -> None:
    # Whether the device exists is the running machine's business; its spelling is the config's.
    for name in ("device", "llm_device", "act_store_device"):
        value = getattr(cfg, name)
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"{name}={value!r} is not a torch device; use e.g. {name}='cpu', 'cuda' or 'cuda:0'."
            ) from None


def check_sae_supported(sae: Any, prefix: str = "sae.") -> None:
    """Refuse what an SAE config asks that this package's training cannot do, naming the field
    (``prefix`` + its name) and the fix."""
    norm = sae.normalize_activations
    if norm not in SUPPORTED_NORMALIZATIONS:
        raise ValueError(
            f"{prefix}normalize_activations={norm!r} is not supported by end-to-end training: "
            "the spliced reconstruction must be mapped back to the model's scale. "
            f"Use one of {list(SUPPORTED_NORMALIZATIONS)}."
        )
    if getattr(sae, "use_sparse_activations", False) is True:
        # SAELens' TopK then makes a sparse COO tensor, whose backward pass through its decoder
        # fails inside torch (no 'view' for sparse tensors), after the first batch has run.
        raise ValueError(
            f"{prefix}use_sparse_activations=True is not supported in training: SAELens' sparse "
            "TopK activations fail in the backward pass (torch has no 'view' for sparse "
            f"tensors). Set {prefix}use_sparse_activations=False (the default): the same SAE, "
            "trained with dense activations; sae-e2e eval still reads sparse ones."
        )


def _check_unsupported_settings(cfg: E2ERunnerConfig[Any]) -> None:
    check_model_class(cfg.model_class_name)
    check_sae_supported(cfg.sae)
    refusals = [
        (
            cfg.use_cached_activations,
            "use_cached_activations=True",
            "e2e runs the model on tokens in every step; set use_cached_activations=False",
        ),
        (
            bool(cfg.prefetch_llm_batches),
            f"prefetch_llm_batches={cfg.prefetch_llm_batches}",
            "in e2e the model runs inside the training step, so there is nothing to "
            "prefetch; set prefetch_llm_batches=False",
        ),
        (
            cfg.hook_head_index is not None,
            f"hook_head_index={cfg.hook_head_index}",
            "splicing a single head is not supported; train on the whole hook "
            "(hook_head_index=None)",
        ),
        (
            cfg.compile_llm,
            "compile_llm=True",
            "SAELens compiles run_with_cache, which e2e does not use; set compile_llm=False",
        ),
    ]
    for refused, setting, fix in refusals:
        if refused:
            raise ValueError(f"{setting} is not supported with loss={cfg.loss!r}: {fix}.")
