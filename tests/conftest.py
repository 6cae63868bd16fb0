"""Shared fixtures: tiny random HookedTransformers and pre-tokenized datasets (no network)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from datasets import Dataset
from sae_lens import LoggingConfig, StandardTrainingSAEConfig
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_e2e_plugin import E2ERunnerConfig

D_MODEL = 16
CONTEXT = 8
VOCAB = 40


def tiny_model(seed: int = 0, n_layers: int = 3, **overrides: Any) -> HookedTransformer:
    """A 3-layer, d_model=16 transformer with random weights."""
    fields: dict[str, Any] = dict(
        n_layers=n_layers,
        d_model=D_MODEL,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=VOCAB,
        n_ctx=32,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        device="cpu",
    )
    cfg = HookedTransformerConfig(**(fields | overrides))
    model = HookedTransformer(cfg)
    # Larger-than-default weights so the next-token distributions are far from uniform.
    with torch.no_grad():
        model.unembed.W_U.mul_(8.0)
    return model.eval()


def token_dataset(n_rows: int = 64, seed: int = 0, context: int = CONTEXT) -> Dataset:
    """Pre-tokenized rows of exactly ``context`` tokens, drawn from a skewed distribution."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.linspace(1.0, 0.05, VOCAB)
    tokens = torch.multinomial(weights, n_rows * context, replacement=True, generator=gen)
    return Dataset.from_dict({"tokens": tokens.view(n_rows, context).tolist()})


def make_cfg(tmp_path: Any, sae_cfg: Any = None, **overrides: Any) -> E2ERunnerConfig[Any]:
    """An E2ERunnerConfig for the tiny model: 4 sequences per step, files under tmp_path."""
    fields: dict[str, Any] = dict(
        sae=sae_cfg or StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=64, l1_coefficient=1e-3),
        model_name="tiny",
        hook_name="blocks.1.hook_resid_pre",
        dataset_path="unused",
        is_dataset_tokenized=True,
        context_size=CONTEXT,
        prepend_bos=False,
        train_batch_size_tokens=4 * CONTEXT,
        training_tokens=10 * 4 * CONTEXT,
        n_batches_in_buffer=4,
        store_batch_size_prompts=4,
        lr=3e-3,
        device="cpu",
        seed=0,
        checkpoint_path=str(tmp_path / "checkpoints"),
        output_path=str(tmp_path / "output"),
        verbose=False,
        loss="e2e",
        logger=LoggingConfig(log_to_wandb=False),
    )
    fields.update(overrides)
    return E2ERunnerConfig(**fields)


@pytest.fixture
def model() -> HookedTransformer:
    return tiny_model()


@pytest.fixture
def dataset() -> Dataset:
    return token_dataset()
