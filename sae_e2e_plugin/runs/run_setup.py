"""What a run resolves once before it trains: the built-in model and corpus it names, the SAE's
initial weights from the seed alone, a warning for a bf16 model on a CPU that emulates bf16,
and the positions the SAE reads and replaces."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from sae_lens.config import HfDataset
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
from sae_lens.training.activations_store import ActivationsStore

from sae_e2e_plugin.assets.corpora import is_builtin_dataset, load_builtin_dataset
from sae_e2e_plugin.assets.language_model import load_language_model
from sae_e2e_plugin.assets.model import is_builtin_model
from sae_e2e_plugin.config_files import without_secrets
from sae_e2e_plugin.core.positions import PositionFilter
from sae_e2e_plugin.runs.data_paths import local_dataset
from sae_e2e_plugin.training.config.e2e_config import E2ERunnerConfig
from sae_e2e_plugin.training.config.numbers import check_numbers

logger = logging.getLogger(__name__)


def initial_weights_from_seed(sae: TrainingSAE[Any], cfg: E2ERunnerConfig[Any]) -> None:
    """Draw ``sae``'s initial weights again, from ``cfg.seed`` alone, and leave torch's
    generator in the state that follows them.

    SAELens draws them from torch's global generator after loading the model, and loading a
    model draws from it too (a ``HookedTransformer`` is built with random weights first): a run
    whose model was loaded for it (``sae-e2e train``, a built-in model) started from other
    weights than the same config given an already loaded model (the Python API, sweeps).
    Redrawn here, every path starts, and continues, from the same state."""
    torch.manual_seed(cfg.seed)
    sae_cfg = TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict())
    fresh = TrainingSAE.from_dict(sae_cfg.to_dict())
    with torch.no_grad():
        sae.load_state_dict(fresh.state_dict())


def resolve_builtins(
    cfg: E2ERunnerConfig[Any],
    model: Any,
    dataset: HfDataset | None,
) -> tuple[Any, HfDataset | None]:
    """Load the bundled model / corpus when ``model_name`` / ``dataset_path`` name one.

    SAELens loads any other model itself; a built-in corpus needs the model's tokenizer, so
    then the model is loaded here too. The config's numbers are checked again first: Python
    code may have changed a field after the config was built (``cfg.sae.d_sae = 0``).
    """
    check_numbers(cfg)
    if model is None and (is_builtin_model(cfg.model_name) or is_builtin_dataset(cfg.dataset_path)):
        model = load_language_model(
            cfg.model_name,
            model_class_name=cfg.model_class_name,
            device=cfg.llm_device or cfg.device,
            model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
        )
    if dataset is None and is_builtin_dataset(cfg.dataset_path):
        assert model is not None
        dataset = load_builtin_dataset(
            cfg.dataset_path, model.tokenizer, cfg.context_size, split="train"
        ).shuffle(seed=cfg.seed)
    return model, dataset


def with_dataset(cfg: E2ERunnerConfig[Any], dataset_path: str) -> E2ERunnerConfig[Any]:
    # A shallow copy: no __post_init__ (which would re-validate and rename checkpoint_path).
    other = copy.copy(cfg)
    other.dataset_path = dataset_path
    return other


def model_dtype(cfg: E2ERunnerConfig[Any]) -> str | None:
    """The dtype ``lm_dtype`` asks for on this run's model device (None: as loaded)."""
    if cfg.lm_dtype != "auto":
        return cfg.lm_dtype
    device = str(cfg.llm_device or cfg.device)
    # GPUs run bf16 matrix products natively; CPUs mostly emulate them (check_precisions).
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    return "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else None


def check_precisions(cfg: E2ERunnerConfig[Any], lm_dtype: str | None) -> None:
    """Warn where a bf16 setting (the model's dtype ``lm_dtype``, ``clean_run_dtype``) would be
    emulated on this CPU; refuse ``clean_run_dtype='bfloat16'`` on a GPU without bf16."""
    device = str(cfg.llm_device or cfg.device)
    for field, value in (("lm_dtype", lm_dtype), ("clean_run_dtype", cfg.clean_run_dtype)):
        if value == "bfloat16" and device.startswith("cpu") and not _native_bf16_cpu():
            logger.warning(
                f"{field}='bfloat16' on a CPU without AVX-512-BF16 or AMX: bf16 matrix products "
                f"are emulated here and run many times slower than float32. Leave {field} unset "
                "on this machine."
            )
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    if cfg.clean_run_dtype == "bfloat16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"clean_run_dtype='bfloat16', but the GPU at {device!r} does not support bf16; "
            "use clean_run_dtype='float16' or leave it unset."
        )


def _native_bf16_cpu() -> bool:
    # Without AVX-512-BF16 or AMX, a CPU emulates bf16 matrix products: on a 2-core AVX2 host
    # a [256, 576] × [576, 1536] product took 401 ms in bf16 against 17 ms in float32.
    return bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


def position_filter(cfg: E2ERunnerConfig[Any], store: ActivationsStore) -> PositionFilter:
    # The store resolves exclude_special_tokens=True to the tokenizer's special ids.
    excluded = store.exclude_special_tokens
    ids = () if excluded is None else tuple(int(i) for i in excluded.tolist())
    return PositionFilter(seqpos_slice=tuple(cfg.seqpos_slice), excluded_ids=ids)


def held_out_tokens(
    cfg: E2ERunnerConfig[Any],
    model: Any,
    store: ActivationsStore,
    *,
    training_on_it: bool,
) -> torch.Tensor | None:
    """[n_eval_sequences, context_size] tokens the run evaluates on (None when there are none).

    A built-in corpus has its own eval split; ``eval_dataset_path`` names another corpus;
    otherwise the first sequences of the training stream are held out (``training_on_it``:
    the store is the training one, and training starts after them).
    """
    n = cfg.n_eval_sequences
    if n == 0:
        return None
    if cfg.eval_dataset_path is None and training_on_it:
        return store.get_batch_tokens(n, move_to_model_device=False)
    name = cfg.eval_dataset_path or cfg.dataset_path
    if is_builtin_dataset(name):
        rows = load_builtin_dataset(name, model.tokenizer, cfg.context_size, split="eval")
        if len(rows) < n:
            raise ValueError(
                f"the eval split of {name!r} has {len(rows)} sequences of {cfg.context_size} "
                f"tokens, fewer than n_eval_batches × eval_batch_size_prompts = {n}. "
                "Lower n_eval_batches or eval_batch_size_prompts."
            )
        return torch.tensor(rows["tokens"][:n], dtype=torch.long)
    other = with_dataset(cfg, name)  # a local eval_dataset_path is read and checked too
    eval_store = ActivationsStore.from_config(model, other, override_dataset=local_dataset(other))
    return eval_store.get_batch_tokens(n, move_to_model_device=False)


def start_wandb(cfg: E2ERunnerConfig[Any]) -> None:
    """Start the run's wandb run (rank 0, ``logger.log_to_wandb``), its config logged without
    credentials (``model_from_pretrained_kwargs`` tokens and the like)."""
    import wandb

    wandb.init(
        project=cfg.logger.wandb_project,
        entity=cfg.logger.wandb_entity,
        config=without_secrets(cfg.to_dict()),
        name=cfg.logger.run_name,
        id=cfg.logger.wandb_id,
    )
