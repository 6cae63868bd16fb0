"""Numeric config fields: their types and the ranges training can use.

SAELens' ``LanguageModelSAERunnerConfig`` checks few numbers; a zero batch, a NaN learning
rate or a ``k`` wider than the SAE would fail deep inside torch or train something other
than what was asked. ``check_numbers`` runs before SAELens' own ``__post_init__`` (which
computes with them) and refuses each with the field, the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sae_lens.saes.sae import TrainingSAEConfig

from sae_e2e_plugin.training.config.field_types import check_field_types

# Numbers SAELens accepts but training cannot use: (field, what it must be, test).
# "sae." fields are checked when the SAE's config class has them.
_NUMBER_RULES: list[tuple[str, str, Callable[[Any], bool]]] = [
    ("lr", "a finite number > 0, e.g. 3e-4", lambda v: _finite(v) and v > 0),
    ("lr_end", "None or a finite number >= 0", lambda v: v is None or _finite(v) and v >= 0),
    ("lr_warm_up_steps", ">= 0 (0: no warm-up)", lambda v: v >= 0),
    ("lr_decay_steps", ">= 0 (0: no decay)", lambda v: v >= 0),
    ("n_restart_cycles", ">= 1", lambda v: v >= 1),
    ("adam_beta1", "in [0, 1), e.g. 0.9", lambda v: _finite(v) and 0 <= v < 1),
    ("adam_beta2", "in [0, 1), e.g. 0.999", lambda v: _finite(v) and 0 <= v < 1),
    ("n_checkpoints", ">= 0 (0: no checkpoints)", lambda v: v >= 0),
    ("context_size", ">= 1", lambda v: v >= 1),
    ("train_batch_size_tokens", ">= 1", lambda v: v >= 1),
    ("store_batch_size_prompts", ">= 1", lambda v: v >= 1),
    ("n_batches_in_buffer", ">= 1", lambda v: v >= 1),
    ("eval_batch_size_prompts", "None or >= 1", lambda v: v is None or v >= 1),
    ("dead_feature_window", ">= 1", lambda v: v >= 1),
    ("feature_sampling_window", ">= 1", lambda v: v >= 1),
    ("dead_feature_threshold", "a finite number >= 0", lambda v: _finite(v) and v >= 0),
    ("n_batches_for_norm_estimate", ">= 1", lambda v: v >= 1),
    (
        "distributed_timeout_s",
        "a finite number of seconds > 0, e.g. 600",
        lambda v: _finite(v) and v > 0,
    ),
    ("logger.wandb_log_frequency", ">= 1", lambda v: v >= 1),
    ("logger.eval_every_n_wandb_logs", ">= 1", lambda v: v >= 1),
    ("sae.d_in", ">= 1 (the width of the hook's activation)", lambda v: v >= 1),
    ("sae.d_sae", ">= 1 (the number of features)", lambda v: v >= 1),
    (
        "sae.decoder_init_norm",
        "None or a finite number > 0",
        lambda v: v is None or _finite(v) and v > 0,
    ),
    ("sae.jumprelu_bandwidth", "a finite number > 0, e.g. 0.05", lambda v: _finite(v) and v > 0),
    ("sae.topk_threshold_lr", "a finite number >= 0, e.g. 0.01", lambda v: _finite(v) and v >= 0),
]

LR_SCHEDULERS = ("constant", "cosineannealing", "cosineannealingwarmrestarts")


def check_numbers(cfg: Any) -> None:
    """Refuse numeric fields of the wrong type or out of range, naming the field, value and fix.

    ``cfg`` is an ``E2ERunnerConfig`` (not imported: the config module imports this one)."""
    if not isinstance(cfg.sae, TrainingSAEConfig):
        raise ValueError(
            f"sae={cfg.sae!r} is a {type(cfg.sae).__name__}; pass a SAELens training SAE config, "
            "e.g. StandardTrainingSAEConfig(d_in=..., d_sae=...), or build the config from a "
            "mapping with sae_e2e_plugin.training.config.fields.config_from_fields."
        )
    check_field_types(cfg)
    check_field_types(cfg.sae, "sae.")
    check_field_types(cfg.logger, "logger.")
    for name, requirement, ok in _NUMBER_RULES:
        owner, _, field = name.rpartition(".")
        target = getattr(cfg, owner) if owner else cfg
        if hasattr(target, field) and not ok(getattr(target, field)):
            raise ValueError(f"{name} must be {requirement}, got {getattr(target, field)!r}.")
    _check_sae_sparsity(cfg.sae)


def check_run_length(cfg: Any) -> None:
    """Refuse a token budget or schedule that the run's steps cannot honour exactly."""
    _check_training_tokens(cfg)
    _check_schedule(cfg)


def _finite(value: Any) -> bool:
    return math.isfinite(value)


def _check_sae_sparsity(sae: TrainingSAEConfig) -> None:
    for name, value in vars(sae).items():
        if value is None:
            continue
        # A NaN or negative sparsity weight would fail at the first step as a "loss is NaN".
        if name.endswith("_coefficient"):
            check_coefficient(f"sae.{name}", value)
        if name.endswith("_warm_up_steps") and value < 0:
            raise ValueError(f"sae.{name} must be >= 0 (0: no warm-up), got {value!r}.")
    k = getattr(sae, "k", None)
    if k is not None and not (_finite(k) and 0 < k <= sae.d_sae):
        raise ValueError(
            f"sae.k={k!r} must be > 0 and at most sae.d_sae={sae.d_sae} (it is the number of "
            f"active features per token); use e.g. sae.k={max(1, min(32, sae.d_sae))}."
        )


def _check_training_tokens(cfg: Any) -> None:
    # SAETrainer trains until it has consumed training_tokens, so a remainder adds a whole batch.
    tokens, batch = cfg.training_tokens, cfg.train_batch_size_tokens
    if tokens >= batch and tokens % batch == 0:
        return
    if tokens < batch:
        raise ValueError(
            f"training_tokens={tokens} is less than one training batch (train_batch_size_tokens="
            f"{batch}); use training_tokens={batch} or a larger multiple of {batch}."
        )
    lower = tokens // batch * batch
    raise ValueError(
        f"training_tokens={tokens} is not a multiple of train_batch_size_tokens={batch}: the run "
        f"would train {lower + batch} tokens. Use training_tokens={lower} or {lower + batch}."
    )


def _check_schedule(cfg: Any) -> None:
    if str(cfg.lr_scheduler_name).lower() not in LR_SCHEDULERS:
        raise ValueError(
            f"lr_scheduler_name={cfg.lr_scheduler_name!r} is not a SAELens scheduler; "
            f"use one of {list(LR_SCHEDULERS)}."
        )
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    counts = [
        (
            "lr_warm_up_steps + lr_decay_steps",
            cfg.lr_warm_up_steps + cfg.lr_decay_steps,
            "the learning-rate schedule would never finish",
        ),
        ("n_checkpoints", cfg.n_checkpoints, "at most one checkpoint is written per step"),
        ("eval_every_n_steps", cfg.eval_every_n_steps, "no evaluation would run during training"),
    ]
    counts += [
        (f"sae.{name}", value, "the coefficient would never reach its full value")
        for name, value in vars(cfg.sae).items()
        if name.endswith("_warm_up_steps")
    ]
    for name, value, why in counts:
        if value > steps:
            raise ValueError(
                f"{name}={value} is more than the run's {steps} training steps (training_tokens"
                f" / train_batch_size_tokens): {why}. Lower it or raise training_tokens."
            )
    if cfg.lr_decay_steps > 0 and cfg.lr_end == 0:
        raise ValueError(
            f"lr_decay_steps={cfg.lr_decay_steps} decays from lr_end=0.0, which is already 0; "
            "set lr_end > 0 or lr_decay_steps=0."
        )


def check_coefficient(name: str, value: float) -> None:
    """Refuse a weight that is not a finite number >= 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_e2e_schedule(cfg: Any, local: bool) -> None:
    """Refuse an ``e2e_fraction`` / ``kl_mse_balance`` the run cannot honour.

    ``local``: the objective has no end-to-end part (``loss="local"``)."""
    fraction = cfg.e2e_fraction
    if isinstance(fraction, bool) or not (_finite(fraction) and 0 < fraction <= 1):
        raise ValueError(
            f"e2e_fraction must be in (0, 1] (the share of training_tokens trained end to end), "
            f"got {fraction!r}; use e.g. e2e_fraction=0.1, or 1.0 for end-to-end training throughout."
        )
    if fraction < 1 and local:
        raise ValueError(
            f"e2e_fraction={fraction} with loss={cfg.loss!r}: a local objective has no end-to-end "
            "phase to switch to. Set loss='e2e' (or 'e2e_downstream'), or e2e_fraction=1.0."
        )
    batch = cfg.train_batch_size_tokens
    if fraction * cfg.training_tokens < batch:
        least = batch / cfg.training_tokens
        raise ValueError(
            f"e2e_fraction={fraction} of training_tokens={cfg.training_tokens} is "
            f"{fraction * cfg.training_tokens:g} tokens, less than one training batch "
            f"(train_batch_size_tokens={batch}): no end-to-end step would run. Use "
            f"e2e_fraction >= {least:.6g}, or raise training_tokens."
        )
    if cfg.kl_mse_balance not in ("fixed", "adaptive"):
        raise ValueError(
            f"kl_mse_balance={cfg.kl_mse_balance!r} is not a choice; use 'fixed' or 'adaptive'."
        )
    if cfg.kl_mse_balance == "adaptive" and local:
        raise ValueError(
            f"kl_mse_balance='adaptive' with loss={cfg.loss!r}: there is no KL term to balance "
            "against the MSE. Set loss='e2e' (or 'e2e_downstream'), or kl_mse_balance='fixed'."
        )
    if cfg.kl_mse_balance == "adaptive" and cfg.local_mse_coefficient != 0:
        raise ValueError(
            f"kl_mse_balance='adaptive' with local_mse_coefficient={cfg.local_mse_coefficient}: "
            "the adaptive mix sets the MSE's weight itself (0.5). Set local_mse_coefficient=0, "
            "or kl_mse_balance='fixed' for a fixed mix."
        )
