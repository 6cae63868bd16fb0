"""``hook_name_out``: a transcoder's output hook, from config and flags, refused by name when it
is missing, extra, of the wrong width or in the wrong place; and a tiny Hugging Face Llama
whose MLP a transcoder replaces."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import D_MODEL, make_cfg, tiny_model, token_dataset
from sae_lens import SAE, StandardTrainingSAEConfig
from sae_lens.load_model import HookedProxyLM
from test_hf_splice import D, tiny
from test_multi_hf import hf_fields
from test_multi_sae import multi_cfg, multi_runner
from transcoders_common import make_transcoder

from sae_e2e_plugin import E2ERunnerConfig, E2ESAETrainingRunner
from sae_e2e_plugin.cli.commands import parse_field_flags
from sae_e2e_plugin.core import model_splice
from sae_e2e_plugin.training.config.fields import config_from_fields

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
HF_IN, HF_OUT = "model.layers.1.post_attention_layernorm", "model.layers.1.mlp"


def transcoder_cfg(d_in: int = D_MODEL, d_out: int = D_MODEL) -> Any:
    return make_transcoder("transcoder", False, d_in=d_in, d_out=d_out, d_sae=32).cfg


def runner(tmp_path: Path, sae_cfg: Any, **fields: Any) -> E2ESAETrainingRunner:
    cfg = make_cfg(tmp_path, sae_cfg, hook_name=HOOK_IN, **fields)
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def test_a_transcoder_config_needs_hook_name_out(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"sae is a transcoder .* hook_name_out is not set"):
        make_cfg(tmp_path, transcoder_cfg(), hook_name=HOOK_IN)


def test_an_sae_config_refuses_hook_name_out(tmp_path: Path) -> None:
    sae_cfg = StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=32)
    with pytest.raises(ValueError, match=r"hook_name_out='blocks.1.hook_mlp_out' is set, but sae"):
        make_cfg(tmp_path, sae_cfg, hook_name=HOOK_IN, hook_name_out=HOOK_OUT)


@pytest.mark.parametrize(
    ("sae_cfg", "hook_out", "message"),
    [
        (transcoder_cfg(d_out=12), HOOK_OUT, r"sae.d_out is 12, but .* hook_name_out="),
        (transcoder_cfg(d_in=12), HOOK_OUT, r"sae.d_in is 12, but .* hook_name="),
        (transcoder_cfg(), "blocks.1.hook_resid_pre", r"runs at or before hook_name="),
        (transcoder_cfg(), "blocks.2.hook_mlp_out", r"are not in the same block"),
        (transcoder_cfg(), "blocks.1.hook_mlp_outt", r"hook_name_out=.* is not a hook point"),
    ],
)
def test_widths_and_order_are_refused_by_name_before_training(
    tmp_path: Path, sae_cfg: Any, hook_out: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        runner(tmp_path, sae_cfg, hook_name_out=hook_out)


def test_hook_name_out_comes_from_a_file_and_flags_alike(tmp_path: Path) -> None:
    fields = {
        "sae": {"architecture": "transcoder", "d_in": D_MODEL, "d_out": D_MODEL, "d_sae": 32},
        "hook_name": HOOK_IN,
        "hook_name_out": HOOK_OUT,
        "model_name": "tiny",
        "dataset_path": "unused",
        "context_size": 8,
        "train_batch_size_tokens": 32,
        "training_tokens": 320,
        "output_path": str(tmp_path / "out"),
    }
    cfg = config_from_fields(fields)
    assert cfg.hook_name_out == HOOK_OUT and cfg.sae.d_out == D_MODEL
    assert cfg.to_dict()["hook_name_out"] == HOOK_OUT
    flags = [f"--{key}={value}" for key, value in fields.items() if key != "sae"]
    flags += [f"--sae.{key}={value}" for key, value in fields["sae"].items()]
    from_flags = config_from_fields(parse_field_flags(flags))
    assert (from_flags.hook_name, from_flags.hook_name_out) == (HOOK_IN, HOOK_OUT)
    assert from_flags.sae.to_dict() == cfg.sae.to_dict()


def test_several_transcoders_are_named_per_sae(tmp_path: Path) -> None:
    saes = {"mlp1": transcoder_cfg(), "resid": StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=32)}
    hooks = {"mlp1": HOOK_IN, "resid": "blocks.2.hook_resid_pre"}
    with pytest.raises(ValueError, match=r"saes\['mlp1'\] is a transcoder .* hook_names_out"):
        multi_cfg(tmp_path, saes, hooks, "independent")
    extra = {"mlp1": HOOK_OUT, "resid": "blocks.2.hook_mlp_out"}
    with pytest.raises(ValueError, match=r"hook_names_out\['resid'\]=.* is set, but saes"):
        multi_cfg(tmp_path, saes, hooks, "independent", hook_names_out=extra)
    wide = {"mlp1": transcoder_cfg(d_out=12), "resid": saes["resid"]}
    with pytest.raises(
        ValueError, match=r"saes\['mlp1'\].d_out is 12, .* hook_names_out\['mlp1'\]="
    ):
        multi_runner(tmp_path, wide, hooks, "independent", hook_names_out={"mlp1": HOOK_OUT})
    run = multi_runner(tmp_path, saes, hooks, "independent", hook_names_out={"mlp1": HOOK_OUT})
    assert run.cfg.to_dict()["hook_names_out"] == {"mlp1": HOOK_OUT}
    run.run()
    exported = SAE.load_from_disk(str(tmp_path / "output" / "mlp1"))
    assert exported.cfg.metadata.hook_name_out == HOOK_OUT
    assert type(exported).__name__ == "Transcoder"
    assert (
        "hook_name_out" not in SAE.load_from_disk(str(tmp_path / "output" / "resid")).cfg.metadata
    )


def hf_llama() -> Any:
    model = tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def hf_logits_with_mlp_replaced(model: Any, tokens: torch.Tensor, sae: Any) -> torch.Tensor:
    """Logits with ``HF_OUT``'s output replaced by ``sae`` of ``HF_IN``'s output (forward hooks
    on the plain model)."""
    captured: dict[str, torch.Tensor] = {}

    def capture(module: Any, args: Any, output: Any) -> None:
        captured["x"] = output

    def swap(module: Any, args: Any, output: Any) -> Any:
        return sae(captured["x"].flatten(0, 1)).view(output.shape)

    handles = [
        model.get_submodule(HF_IN).register_forward_hook(capture),
        model.get_submodule(HF_OUT).register_forward_hook(swap),
    ]
    try:
        return model(input_ids=tokens).logits
    finally:
        for handle in handles:
            handle.remove()


def test_a_hf_llama_transcoder_splice_equals_a_hand_mlp_replacement() -> None:
    model = hf_llama()
    torch.manual_seed(0)
    sae = make_transcoder("transcoder", True, d_in=D, d_out=D, d_sae=32)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    tokens = torch.tensor(token_dataset(n_rows=2, seed=3)["tokens"])
    plan = model_splice.plan_splice(model, HF_IN, None, d_in=D, hook_name_out=HF_OUT, d_out=D)
    assert plan.start_layer == 1 and plan.downstream_hooks == ("model.layers.1", "model.layers.2")
    prefix = model_splice.run_prefix(model, tokens, plan)
    clean = model_splice.run_clean(model, prefix, plan)
    assert clean.target is not None and clean.final_resid is not None
    replacement = sae(clean.acts.flatten(0, 1)).view(clean.target.shape)
    patched = model_splice.run_patched(model, prefix, plan, replacement)
    head = model_splice.model_head(model, plan)
    logits = head(patched.final_resid.flatten(0, 1))
    hand = copy.deepcopy(sae)
    expected = hf_logits_with_mlp_replaced(model, tokens, hand)
    torch.testing.assert_close(logits, expected.flatten(0, 1), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        clean_logits = head(clean.final_resid.flatten(0, 1))
    kl = F.kl_div(
        F.log_softmax(logits, -1),
        F.log_softmax(clean_logits, -1),
        log_target=True,
        reduction="batchmean",
    )
    hand_kl = F.kl_div(
        F.log_softmax(expected.flatten(0, 1), -1),
        F.log_softmax(clean_logits, -1),
        log_target=True,
        reduction="batchmean",
    )
    kl.backward()
    hand_kl.backward()
    for name, param in hand.named_parameters():
        got = dict(sae.named_parameters())[name].grad
        assert param.grad is not None and got is not None
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def test_a_hf_llama_transcoder_trains_and_exports_both_hooks(tmp_path: Path) -> None:
    fields = hf_fields(tmp_path, hook_name=HF_IN, hook_name_out=HF_OUT, e2e_fraction=0.5)
    sae_cfg = make_transcoder("transcoder", False, d_in=D, d_out=D, d_sae=32).cfg
    cfg = E2ERunnerConfig(sae=sae_cfg, **fields)
    # SAELens' HookedProxyLM: its activation buffer (the local phase) runs the model with a cache.
    model = HookedProxyLM(hf_llama(), tokenizer=None)  # type: ignore[arg-type]
    run = E2ESAETrainingRunner(cfg, override_model=model, override_dataset=token_dataset())
    run.run()
    exported = SAE.load_from_disk(str(tmp_path / "output"))
    assert exported.cfg.metadata.hook_name == HF_IN
    assert exported.cfg.metadata.hook_name_out == HF_OUT


@pytest.mark.parametrize(
    ("hook_out", "d_out", "message"),
    [
        (HF_OUT, 12, r"sae.d_out is 12, but .* hook_name_out='model.layers.1.mlp'"),
        ("model.layers.1.self_attn.o_proj", D, r"runs at or before hook_name="),
        ("model.layers.2.mlp", D, r"are not in the same block"),
        ("model.layers.1.mlpp", D, r"hook_name_out="),
    ],
)
def test_a_hf_model_refuses_bad_output_modules_by_name(
    hook_out: str, d_out: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        model_splice.plan_splice(
            hf_llama(), HF_IN, None, d_in=D, hook_name_out=hook_out, d_out=d_out
        )


def test_evaluation_asks_for_the_output_hook_of_a_transcoder_and_refuses_one_for_an_sae() -> None:
    from sae_lens import StandardTrainingSAE

    from sae_e2e_plugin import evaluate_sae

    model, tokens = tiny_model(), torch.tensor(token_dataset(n_rows=2)["tokens"])
    transcoder = make_transcoder("transcoder", False, d_in=D_MODEL, d_out=D_MODEL, d_sae=32)
    with pytest.raises(ValueError, match=r"transcoder, but hook_name_out is not set"):
        evaluate_sae(transcoder, model, tokens, hook_name=HOOK_IN)
    result = evaluate_sae(transcoder, model, tokens, hook_name=HOOK_IN, hook_name_out=HOOK_OUT)
    assert result.hook_name_out == HOOK_OUT
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=32))
    with pytest.raises(ValueError, match=r"hook_name_out='blocks.1.hook_mlp_out' is given, but"):
        evaluate_sae(sae, model, tokens, hook_name=HOOK_OUT, hook_name_out=HOOK_OUT)
