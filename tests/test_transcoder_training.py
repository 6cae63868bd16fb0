"""Transcoders trained end to end on a tiny HookedTransformer: the splice, the gradient and the
local MSE against hand-written formulas, and a short run whose export lowers the spliced KL.

The transcoder reads ``blocks.1.ln2.hook_normalized`` (the MLP's input) and replaces
``blocks.1.hook_mlp_out`` (its output). Every "hand" computation below runs the plain model
with TransformerLens hooks (``run_with_hooks``) and none of the package's splice code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from sae_lens import SAE, HookedSAETransformer
from transcoders_common import ARCHITECTURES, hand_forward, make_transcoder, random_transcoder

from sae_e2e_plugin import E2ESAETrainingRunner, evaluate_sae
from sae_e2e_plugin.core.model_splice import run_clean, run_patched
from sae_e2e_plugin.core.splice import (
    logits_from_final_resid,
    plan_splice,
    run_prefix,
)

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
TOKENS = torch.tensor(token_dataset(n_rows=4, seed=7)["tokens"])


def small_transcoder(arch: str = "transcoder", skip: bool = False, seed: int = 0) -> Any:
    sae = random_transcoder(arch, skip, seed, d_in=D_MODEL, d_out=D_MODEL, d_sae=32)
    with torch.no_grad():
        sae.W_dec.mul_(0.1)  # MLP-output-sized writes: logits finite and sensitive
        if skip:
            sae.W_skip.mul_(0.1)
    return sae


def logits_with_mlp_replaced(model: Any, tokens: torch.Tensor, replace: Any) -> torch.Tensor:
    """The model's logits with ``HOOK_OUT`` replaced by ``replace(input captured at HOOK_IN)``
    (grad flows into ``replace``'s parameters when it is enabled)."""
    captured: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor, hook: Any) -> None:
        captured["x"] = act

    def swap(act: torch.Tensor, hook: Any) -> torch.Tensor:
        x = captured["x"]
        return replace(x.flatten(0, 1)).view(act.shape)

    return model.run_with_hooks(tokens, fwd_hooks=[(HOOK_IN, capture), (HOOK_OUT, swap)])


def hand_of(sae: Any) -> Any:
    """The transcoder's output as a function of its input, written out (``hand_forward``)."""
    return lambda x: hand_forward(sae, x)


def kl_per_token(clean: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ p_patched) summed over the vocabulary, averaged over tokens (by hand)."""
    log_p = F.log_softmax(clean.flatten(0, 1).float(), -1)
    log_q = F.log_softmax(patched.flatten(0, 1).float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_the_patched_run_equals_a_forward_with_the_mlp_output_replaced(
    skip: bool, checkpoint_blocks: bool
) -> None:
    model, sae = tiny_model(), small_transcoder(skip=skip)
    plan = plan_splice(model, HOOK_IN, None, d_in=D_MODEL, hook_name_out=HOOK_OUT, d_out=D_MODEL)
    assert plan.start_layer == 1 and plan.write_hook == HOOK_OUT
    assert plan.downstream_hooks == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    prefix = run_prefix(model, TOKENS, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    _, cache = model.run_with_cache(TOKENS)
    torch.testing.assert_close(clean.acts, cache[HOOK_IN])
    assert clean.target is not None
    torch.testing.assert_close(clean.target, cache[HOOK_OUT])
    with torch.enable_grad():
        replacement = sae(clean.acts.flatten(0, 1)).view(clean.target.shape)
        patched = run_patched(model, prefix, plan, replacement, checkpoint_blocks=checkpoint_blocks)
        logits = logits_from_final_resid(model, patched.final_resid)
    with torch.no_grad():
        expected = logits_with_mlp_replaced(model, TOKENS, hand_of(sae))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (expected - model(TOKENS)).abs().max() > 1e-2  # the splice changed the logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kl_gradient_equals_autograd_through_the_plain_model(arch: str) -> None:
    model = tiny_model()
    sae = small_transcoder(arch, skip=True)
    hand = copy.deepcopy(sae)
    plan = plan_splice(model, HOOK_IN, (), d_in=D_MODEL, hook_name_out=HOOK_OUT, d_out=D_MODEL)
    prefix = run_prefix(model, TOKENS, plan.start_layer)
    clean = run_clean(model, prefix, plan)
    assert clean.final_resid is not None and clean.target is not None
    replacement = sae(clean.acts.flatten(0, 1)).view(clean.target.shape)
    patched = run_patched(model, prefix, plan, replacement)
    kl = kl_per_token(
        logits_from_final_resid(model, clean.final_resid),
        logits_from_final_resid(model, patched.final_resid),
    )
    kl.backward()
    with torch.no_grad():
        clean_logits = model(TOKENS)
    hand_kl = kl_per_token(clean_logits, logits_with_mlp_replaced(model, TOKENS, hand))
    hand_kl.backward()
    assert float(kl) == pytest.approx(float(hand_kl), rel=1e-5) and float(kl) > 1e-3
    got = dict(sae.named_parameters())
    for name, param in hand.named_parameters():
        if param.grad is None:  # e.g. a JumpReLU threshold, which no output term reaches here
            assert got[name].grad is None or float(got[name].grad.abs().max()) == 0.0
            continue
        scale = float(param.grad.abs().max())
        torch.testing.assert_close(got[name].grad, param.grad, rtol=1e-4, atol=1e-5 * scale)
    assert float(dict(hand.named_parameters())["W_enc"].grad.abs().max()) > 0


def transcoder_cfg(tmp_path: Path, arch: str = "transcoder", skip: bool = False, **fields: Any):
    sizes = {"d_in": D_MODEL, "d_out": D_MODEL, "d_sae": 32}
    coefficient = {"transcoder": {"l1_coefficient": 1e-4}}.get(arch, {})
    sae_cfg = make_transcoder(arch, skip, **(sizes | coefficient)).cfg
    return make_cfg(tmp_path, sae_cfg, hook_name=HOOK_IN, hook_name_out=HOOK_OUT, **fields)


def runner_for(cfg: Any) -> E2ESAETrainingRunner:
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def hand_mse(sae: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """‖output − MLP output‖² summed over d_out, averaged over tokens."""
    return float((hand_forward(sae, x) - y).pow(2).sum(-1).mean())


def test_the_local_mse_of_an_e2e_step_is_the_error_against_the_mlp_output(
    tmp_path: Path,
) -> None:
    runner = runner_for(transcoder_cfg(tmp_path, loss="e2e", local_mse_coefficient=0.5))
    trainer = runner.build_trainer()
    before = copy.deepcopy(runner.sae)
    outputs = trainer.step(TOKENS)
    _, cache = runner.model.run_with_cache(TOKENS)
    x, y = cache[HOOK_IN].flatten(0, 1), cache[HOOK_OUT].flatten(0, 1)
    output = outputs["sae"]
    assert float(output.metrics["local_mse"]) == pytest.approx(hand_mse(before, x, y), rel=1e-5)
    kl = spliced_kl(runner.model, TOKENS, before)
    assert float(output.metrics["kl_orig_patched"]) == pytest.approx(kl, rel=1e-5)


def test_e2e_downstream_compares_the_residual_streams_after_the_mlp(tmp_path: Path) -> None:
    runner = runner_for(transcoder_cfg(tmp_path, loss="e2e_downstream"))
    hooks = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    assert runner.plan.plans["sae"].downstream_hooks == hooks
    trainer = runner.build_trainer()
    before = copy.deepcopy(runner.sae)
    output = trainer.step(TOKENS)["sae"]
    _, clean = runner.model.run_with_cache(TOKENS)
    patched: dict[str, torch.Tensor] = {}
    record = [(hook, lambda act, hook: patched.__setitem__(hook.name, act)) for hook in hooks]
    captured: dict[str, torch.Tensor] = {}
    swap = [
        (HOOK_IN, lambda act, hook: captured.__setitem__("x", act)),
        (
            HOOK_OUT,
            lambda act, hook: hand_forward(before, captured["x"].flatten(0, 1)).view(act.shape),
        ),
    ]
    with torch.no_grad():
        runner.model.run_with_hooks(TOKENS, fwd_hooks=swap + record)
    for hook in hooks:
        expected = float(F.mse_loss(patched[hook], clean[hook]))
        got = float(output.metrics[f"downstream_mse/{hook}"])
        assert got == pytest.approx(expected, rel=1e-4) and expected > 0


def test_the_local_phase_trains_on_input_and_mlp_output_pairs_of_the_same_tokens(
    tmp_path: Path,
) -> None:
    runner = runner_for(transcoder_cfg(tmp_path, e2e_fraction=0.5))
    trainer = runner.build_trainer()
    assert trainer.local_data is not None
    batch = next(trainer.local_data)
    x, y = batch[HOOK_IN], batch[HOOK_OUT]
    assert x.shape == y.shape == (4 * CONTEXT, D_MODEL)
    with torch.no_grad():  # each target row is the MLP's output on its input row
        torch.testing.assert_close(runner.model.blocks[1].mlp(x[None])[0], y)
    before = copy.deepcopy(runner.sae)
    output = trainer.step(batch)["sae"]
    assert trainer.last_phase == "local"
    assert float(output.losses["mse_loss"]) == pytest.approx(hand_mse(before, x, y), rel=1e-5)


def spliced_kl(model: Any, tokens: torch.Tensor, replace: Any) -> float:
    with torch.no_grad():
        return float(kl_per_token(model(tokens), logits_with_mlp_replaced(model, tokens, replace)))


@pytest.mark.parametrize("skip", [False, True])
def test_training_an_e2e_transcoder_lowers_the_spliced_kl_of_its_export(
    tmp_path: Path, skip: bool
) -> None:
    cfg = transcoder_cfg(tmp_path, skip=skip, training_tokens=30 * 4 * CONTEXT, lr=1e-2)
    runner = runner_for(cfg)
    initial = copy.deepcopy(runner.sae)
    runner.run()
    folder = tmp_path / "output"
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"]) == (HOOK_IN, HOOK_OUT)
    exported = SAE.load_from_disk(str(folder))
    assert type(exported).__name__ == ("SkipTranscoder" if skip else "Transcoder")
    held_out = torch.tensor(token_dataset(n_rows=16, seed=11)["tokens"])
    model = runner.model
    before = spliced_kl(model, held_out, hand_of(initial))
    after = spliced_kl(model, held_out, exported)
    assert after < 0.5 * before, (before, after)
    if not skip:  # SAELens' add_sae leaves a skip term out (tests/test_transcoder_splice.py)
        hooked = HookedSAETransformer(model.cfg)
        hooked.load_state_dict(model.state_dict())
        hooked.add_sae(exported)
        with torch.no_grad():
            via_saelens = float(kl_per_token(model(held_out), hooked(held_out)))
        assert via_saelens == pytest.approx(after, rel=1e-4)


def test_evaluation_measures_the_mlp_output_and_zeroes_it_for_the_ablation(
    tmp_path: Path,
) -> None:
    model, sae = tiny_model(), small_transcoder(skip=True)
    folder = tmp_path / "tc"
    sae.save_inference_model(folder, hook_name=HOOK_IN, hook_name_out=HOOK_OUT)
    exported = SAE.load_from_disk(str(folder))
    result = evaluate_sae(exported, model, TOKENS, alive_window_tokens=None)
    assert result.hook_name_out == HOOK_OUT
    _, cache = model.run_with_cache(TOKENS)
    x, y = cache[HOOK_IN], cache[HOOK_OUT]
    with torch.no_grad():
        out = hand_forward(sae, x.flatten(0, 1)).view(y.shape)
    spread = (y - y.mean(dim=(0, 1))).pow(2).sum(-1)
    ev = float((1 - (out - y).pow(2).sum(-1) / spread).mean())
    assert result.explained_variance == pytest.approx(ev, rel=1e-4)
    with torch.no_grad():
        zeroed = model.run_with_hooks(
            TOKENS, fwd_hooks=[(HOOK_OUT, lambda act, hook: torch.zeros_like(act))]
        )
        clean = model(TOKENS)
    targets = TOKENS[:, 1:].flatten()
    ce_zeroed = float(F.cross_entropy(zeroed[:, :-1].flatten(0, 1), targets))
    assert result.ce_loss_zero_ablation == pytest.approx(ce_zeroed, rel=1e-5)
    spliced = logits_with_mlp_replaced(model, TOKENS, hand_of(sae)).detach()
    assert result.kl_orig_patched == pytest.approx(float(kl_per_token(clean, spliced)), rel=1e-4)
    table = result.format_table()
    assert "MLP output zeroed" in table and HOOK_OUT in table
    assert result.to_dict()["hook_name_out"] == HOOK_OUT


def test_a_pretrained_transcoder_folder_is_the_start_of_a_run(tmp_path: Path) -> None:
    sae = small_transcoder()
    sae.save_inference_model(tmp_path / "pretrained", hook_name=HOOK_IN, hook_name_out=HOOK_OUT)
    cfg = transcoder_cfg(tmp_path, pretrained_sae=str(tmp_path / "pretrained"))
    runner = runner_for(cfg)
    saved = SAE.load_from_disk(str(tmp_path / "pretrained"))
    started = dict(runner.sae.named_parameters())
    for name, param in saved.named_parameters():
        torch.testing.assert_close(started[name], param)


def test_sae_e2e_eval_takes_a_transcoder_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sae_e2e_plugin.assets.language_model as language_model
    import sae_e2e_plugin.cli.eval_command as eval_command
    from sae_e2e_plugin.cli import main

    monkeypatch.setattr(language_model, "load_language_model", lambda *a, **k: tiny_model())
    monkeypatch.setattr(eval_command, "_eval_tokens", lambda *a, **k: TOKENS)
    folder = tmp_path / "tc"
    small_transcoder().save_inference_model(folder, hook_name=HOOK_IN, hook_name_out=HOOK_OUT)
    out = tmp_path / "eval.json"
    flags = ["--model_name", "tiny", "--dataset_path", "x", "--batch_size", "4"]
    assert main(["eval", str(folder), *flags, "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = evaluate_sae(SAE.load_from_disk(str(folder)), tiny_model(), TOKENS).to_dict()
    assert written["hook_name_out"] == HOOK_OUT
    for key in ("kl_orig_patched", "explained_variance", "ce_loss_zero_ablation"):
        assert written[key] == pytest.approx(expected[key], rel=1e-6)


JOINT_IN = {"mlp0": "blocks.0.ln2.hook_normalized", "mlp2": "blocks.2.ln2.hook_normalized"}
JOINT_OUT = {"mlp0": "blocks.0.hook_mlp_out", "mlp2": "blocks.2.hook_mlp_out"}


def test_a_joint_step_of_two_transcoders_has_the_gradient_of_a_hand_double_replacement(
    tmp_path: Path,
) -> None:
    from test_multi_sae import bare_trainer, multi_runner

    saes = {name: transcoder_cfg(tmp_path).sae for name in JOINT_IN}
    runner = multi_runner(tmp_path, saes, JOINT_IN, "joint", hook_names_out=JOINT_OUT)
    for sae in runner.saes.values():  # the KL alone: no sparsity term
        sae.cfg.l1_coefficient = 0.0
    hand = {name: copy.deepcopy(sae) for name, sae in runner.saes.items()}
    trainer = bare_trainer(runner)
    outputs = trainer.step_pass.run(TOKENS, trainer.trainers)
    hooks = joint_hand_splice(hand)
    with torch.no_grad():
        clean = runner.model(TOKENS)
    kl = kl_per_token(clean, runner.model.run_with_hooks(TOKENS, fwd_hooks=hooks))
    kl.backward()
    for name in JOINT_IN:
        assert float(outputs[name].losses["kl_loss"]) == pytest.approx(float(kl), rel=1e-5)
        trained = dict(runner.saes[name].named_parameters())
        for param, value in hand[name].named_parameters():
            got = trained[param].grad
            assert value.grad is not None and got is not None and value.grad.abs().max() > 0
            scale = float(value.grad.abs().max())
            torch.testing.assert_close(got, value.grad, rtol=1e-4, atol=1e-4 * scale)


def joint_hand_splice(transcoders: dict[str, Any]) -> list[Any]:
    """Plain forward hooks that splice every transcoder in at once: each reads the MLP input
    arriving at its JOINT_IN hook and replaces the MLP output at its JOINT_OUT hook."""
    captured: dict[str, torch.Tensor] = {}
    hooks: list[Any] = []
    for name in JOINT_IN:
        hooks.append((JOINT_IN[name], lambda act, hook, n=name: captured.__setitem__(n, act)))
        hooks.append(
            (
                JOINT_OUT[name],
                lambda act, hook, n=name: transcoders[n](captured[n].flatten(0, 1)).view(act.shape),
            )
        )
    return hooks


def test_a_joint_run_of_transcoders_exports_and_evaluates_them_together(tmp_path: Path) -> None:
    from test_multi_sae import multi_runner

    saes = {name: transcoder_cfg(tmp_path).sae for name in JOINT_IN}
    runner = multi_runner(tmp_path, saes, JOINT_IN, "joint", hook_names_out=JOINT_OUT)
    runner.run()
    exported = {n: SAE.load_from_disk(str(tmp_path / "output" / n)) for n in JOINT_IN}
    assert {n: s.cfg.metadata.hook_name_out for n, s in exported.items()} == JOINT_OUT
    joint = runner.joint_eval
    assert joint is not None
    hooks = joint_hand_splice(exported)
    tokens = runner.eval_tokens
    assert tokens is not None
    with torch.no_grad():
        kl = kl_per_token(
            runner.model(tokens), runner.model.run_with_hooks(tokens, fwd_hooks=hooks)
        )
    assert joint.kl_orig_patched == pytest.approx(float(kl), rel=1e-4)


def test_positions_left_out_keep_the_mlps_own_output(tmp_path: Path) -> None:
    runner = runner_for(transcoder_cfg(tmp_path, seqpos_slice=(1, None), local_mse_coefficient=1.0))
    trainer = runner.build_trainer()
    before = copy.deepcopy(runner.sae)
    output = trainer.step(TOKENS)["sae"]
    captured: dict[str, torch.Tensor] = {}

    def swap(act: torch.Tensor, hook: Any) -> torch.Tensor:
        # Position 0 keeps the MLP's own output; the others get the transcoder's.
        new = act.clone()
        new[:, 1:] = hand_forward(before, captured["x"][:, 1:].flatten(0, 1)).view(new[:, 1:].shape)
        return new

    fwd = [(HOOK_IN, lambda act, hook: captured.__setitem__("x", act)), (HOOK_OUT, swap)]
    with torch.no_grad():
        kl = float(
            kl_per_token(runner.model(TOKENS), runner.model.run_with_hooks(TOKENS, fwd_hooks=fwd))
        )
        _, cache = runner.model.run_with_cache(TOKENS)
    assert float(output.metrics["kl_orig_patched"]) == pytest.approx(kl, rel=1e-5)
    x, y = cache[HOOK_IN][:, 1:].flatten(0, 1), cache[HOOK_OUT][:, 1:].flatten(0, 1)
    assert float(output.losses["mse_loss"]) == pytest.approx(hand_mse(before, x, y), rel=1e-5)


@pytest.mark.parametrize("resume_after_steps", [4, 6], ids=["local", "e2e"])
def test_a_transcoder_resumed_around_the_switch_ends_with_the_same_weights(
    tmp_path: Path, resume_after_steps: int
) -> None:
    from test_schedule import BATCH, COMMON, STEPS, assert_same_weights, weights

    def run(folder: Path, **fields: Any) -> E2ESAETrainingRunner:
        cfg = transcoder_cfg(folder, skip=True, **(COMMON | fields))
        data = token_dataset(n_rows=100, seed=3)
        return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=data)

    schedule = dict(e2e_fraction=0.5, n_checkpoints=STEPS - 1)
    full = run(tmp_path / "full", **schedule)
    full.run()
    checkpoint = Path(full.cfg.checkpoint_path or "") / str(resume_after_steps * BATCH)
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint), **schedule)
    resumed.run()
    assert resumed.trainer is not None and resumed.trainer.n_steps_taken == STEPS
    assert_same_weights(weights(full), weights(resumed))


def test_a_bf16_model_chunked_kl_and_checkpointed_blocks_train_a_transcoder(
    tmp_path: Path,
) -> None:
    fields = dict(lm_dtype="bfloat16", kl_chunk_size=5, checkpoint_blocks=True)
    runner = runner_for(transcoder_cfg(tmp_path, "jumprelu_transcoder", skip=True, **fields))
    runner.run()
    assert runner.trainer is not None
    first, last = runner.trainer.first_losses["sae"], runner.trainer.last_losses["sae"]
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert last["kl_loss"] < first["kl_loss"]
    exported = SAE.load_from_disk(str(tmp_path / "output"))
    assert type(exported).__name__ == "JumpReLUSkipTranscoder"
