"""Several SAEs per run on a Hugging Face model (a tiny random Llama): the joint and the
independent splice train through ``core.model_splice`` as on a HookedTransformer."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CONTEXT, token_dataset
from sae_lens import SAE, LoggingConfig, StandardTrainingSAEConfig
from test_hf_splice import D, tiny

from sae_e2e_plugin import (
    E2EMultiRunnerConfig,
    E2EMultiSAETrainingRunner,
    E2ERunnerConfig,
    E2ESAETrainingRunner,
    evaluate_sae,
)
from sae_e2e_plugin.core import hf_runs

HOOKS = {"early": "model.layers.0", "late": "model.layers.1"}
STEPS = 12


def hf_fields(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return (
        dict(
            model_name="tiny-llama",
            model_class_name="AutoModelForCausalLM",
            dataset_path="unused",
            is_dataset_tokenized=True,
            context_size=CONTEXT,
            prepend_bos=False,
            train_batch_size_tokens=4 * CONTEXT,
            training_tokens=STEPS * 4 * CONTEXT,
            n_batches_in_buffer=4,
            store_batch_size_prompts=4,
            lr=1e-2,
            device="cpu",
            seed=0,
            checkpoint_path=str(tmp_path / "checkpoints"),
            output_path=str(tmp_path / "output"),
            verbose=False,
            n_eval_batches=0,
            logger=LoggingConfig(log_to_wandb=False),
        )
        | overrides
    )


def sae_cfg() -> StandardTrainingSAEConfig:
    return StandardTrainingSAEConfig(d_in=D, d_sae=32, l1_coefficient=1e-4)


def llama() -> Any:
    model = tiny("llama")
    # Larger output weights: next-token distributions far from uniform, so the KL is large.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def multi_runner(tmp_path: Path, splice: str, **overrides: Any) -> E2EMultiSAETrainingRunner:
    cfg = E2EMultiRunnerConfig(
        saes={name: sae_cfg() for name in HOOKS},  # type: ignore[arg-type]
        hook_names=HOOKS,
        splice=splice,  # type: ignore[arg-type]
        **hf_fields(tmp_path, **overrides),
    )
    return E2EMultiSAETrainingRunner(cfg, override_model=llama(), override_dataset=token_dataset())


def hand_spliced_kl(
    model: Any, saes: dict[str, Any], tokens: torch.Tensor, *, grad: bool = False
) -> torch.Tensor:
    """KL(clean ‖ spliced) per token with every SAE replacing its layer's output, written with
    plain forward hooks on the whole model (no code of the package's splice)."""

    def replace(module: Any, args: Any, output: Any, *, sae: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        new = sae.decode(sae.encode(hidden))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with torch.no_grad():
        clean = model(input_ids=tokens).logits
    handles = [
        model.get_submodule(HOOKS[name]).register_forward_hook(partial(replace, sae=sae))
        for name, sae in saes.items()
    ]
    try:
        with torch.set_grad_enabled(grad):
            spliced = model(input_ids=tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    log_p, log_q = (F.log_softmax(x.flatten(0, 1).float(), -1) for x in (clean, spliced))
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_a_joint_step_on_a_hf_model_has_the_gradient_of_a_hand_built_double_splice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, checkpoint_blocks: bool
) -> None:
    recomputed: list[int] = []
    real = hf_runs.checkpoint

    def counting(fn: Any, layer: Any, *args: Any, **kw: Any) -> Any:
        recomputed.append(int(layer.self_attn.layer_idx))
        return real(fn, layer, *args, **kw)

    monkeypatch.setattr(hf_runs, "checkpoint", counting)
    runner = multi_runner(tmp_path, "joint", checkpoint_blocks=checkpoint_blocks)
    for sae in runner.saes.values():  # the KL alone: no sparsity term
        sae.cfg.l1_coefficient = 0.0
    tokens = torch.tensor(token_dataset(n_rows=4, seed=7)["tokens"])
    hand = {name: copy.deepcopy(sae) for name, sae in runner.saes.items()}
    trainer = runner_trainer(runner)
    outputs = trainer.step_pass.run(tokens, trainer.trainers)
    kl = hand_spliced_kl(runner.model, hand, tokens, grad=True)
    kl.backward()
    # Layers 0 and 1 hold the SAEs and run plainly; layer 2 is recomputed in the backward pass.
    assert recomputed == ([2] if checkpoint_blocks else [])
    for name in HOOKS:
        assert float(outputs[name].losses["kl_loss"]) == pytest.approx(float(kl), rel=1e-5)
        trained = dict(runner.saes[name].named_parameters())
        for param, value in hand[name].named_parameters():
            got = trained[param].grad
            assert value.grad is not None and got is not None and value.grad.abs().max() > 0
            torch.testing.assert_close(
                got, value.grad, rtol=1e-4, atol=1e-4 * float(value.grad.abs().max())
            )


def test_a_joint_run_on_a_hf_model_exports_saes_whose_joint_kl_matches_a_hand_splice(
    tmp_path: Path,
) -> None:
    runner = multi_runner(tmp_path, "joint")
    runner.run()
    exported = {name: SAE.load_from_disk(str(tmp_path / "output" / name)) for name in HOOKS}
    for name, sae in exported.items():
        assert sae.cfg.metadata.hook_name == HOOKS[name]
        assert sae.cfg.metadata.e2e_objective["splice"] == "joint"
    tokens = torch.tensor(token_dataset(n_rows=8, seed=5)["tokens"])
    joint = evaluate_sae(exported, runner.model, tokens.split(4), hook_names=HOOKS)
    expected = float(hand_spliced_kl(runner.model, exported, tokens))
    assert expected > 0.01
    assert joint.kl_orig_patched == pytest.approx(expected, rel=1e-4)


def test_independent_gradients_on_a_hf_model_equal_single_runs_at_each_hook(
    tmp_path: Path,
) -> None:
    runner = multi_runner(tmp_path, "independent", loss="e2e_downstream")
    tokens = torch.tensor(token_dataset(n_rows=4, seed=7)["tokens"])
    initial = {name: copy.deepcopy(sae) for name, sae in runner.saes.items()}
    trainer = runner_trainer(runner)
    trainer.step_pass.run(tokens, trainer.trainers)
    for name, hook in HOOKS.items():
        single = E2ESAETrainingRunner(
            E2ERunnerConfig(
                sae=sae_cfg(),
                hook_name=hook,
                loss="e2e_downstream",
                **hf_fields(tmp_path / name),
            ),
            override_model=runner.model,
            override_dataset=token_dataset(),
            override_sae=initial[name],
        )
        one = single.build_trainer()
        one.step_pass.run(tokens, one.trainers)  # the gradients, no update
        for param, value in initial[name].named_parameters():
            got = dict(runner.saes[name].named_parameters())[param].grad
            assert value.grad is not None and got is not None and value.grad.abs().max() > 0
            torch.testing.assert_close(got, value.grad, rtol=1e-5, atol=1e-7)


def runner_trainer(runner: E2EMultiSAETrainingRunner) -> Any:
    from test_multi_sae import bare_trainer

    return bare_trainer(runner)


WORKER = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from test_multi_hf import multi_runner
from sae_e2e_plugin.training.parallel.distributed import launcher_context, shutdown

out = Path(sys.argv[2])
for splice in ("joint", "independent"):
    runner = multi_runner(out / splice, splice, training_tokens=4 * 4 * 8)
    saes = runner.run()
    torch.save({n: s.state_dict() for n, s in saes.items()}, out / f"{splice}-{runner.context.rank}.pt")
shutdown(launcher_context())
"""


def test_two_ranks_train_the_saes_one_process_trains_on_a_hf_model(tmp_path: Path) -> None:
    from test_distributed import TOLERANCE, launch, wait_for

    wait_for(launch(tmp_path / "ranks", "train", worker=WORKER))
    for splice in ("joint", "independent"):
        rank0 = torch.load(tmp_path / "ranks" / f"{splice}-0.pt")
        rank1 = torch.load(tmp_path / "ranks" / f"{splice}-1.pt")
        one = multi_runner(tmp_path / splice, splice, training_tokens=4 * 4 * 8)
        start = {n: {k: v.clone() for k, v in s.state_dict().items()} for n, s in one.saes.items()}
        one.run()
        for name in HOOKS:
            for key, value in one.saes[name].state_dict().items():
                assert torch.equal(rank0[name][key], rank1[name][key]), (splice, name, key)
                assert not torch.equal(value, start[name][key]), (splice, name, key)
                torch.testing.assert_close(rank0[name][key], value, **TOLERANCE)
