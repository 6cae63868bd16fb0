"""Several SAEs in one e2e run (joint and independent splices) on tiny random models."""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
import torch.nn.functional as F
from conftest import CONTEXT, D_MODEL, VOCAB, make_cfg, tiny_model, token_dataset
from sae_lens import LoggingConfig, StandardTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE, TrainStepInput

from sae_e2e_plugin import (
    E2EMultiRunnerConfig,
    E2EMultiSAETrainingRunner,
    E2ESAETrainingRunner,
    JointEvalResult,
    evaluate_sae,
)
from sae_e2e_plugin.cli import main
from sae_e2e_plugin.core import multi_splice
from sae_e2e_plugin.core.losses import kl_orig_to_patched
from sae_e2e_plugin.core.splice import logits_from_final_resid
from sae_e2e_plugin.run_files import DiskFullError
from sae_e2e_plugin.runs import multi_runner as multi_runner_module
from sae_e2e_plugin.runs.output_folder import LOCK_FILENAME, FolderInUseError, hold_folder
from sae_e2e_plugin.training.loop.step_pass import StepPass
from sae_e2e_plugin.training.loop.trainer import E2ETrainer
from sae_e2e_plugin.training.parallel.distributed import SINGLE_PROCESS

ARCHITECTURES: dict[str, Any] = {
    "standard": lambda: sae_cfg(),
    "topk": lambda: sae_lens.TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4),
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4),
    "jumprelu": lambda: sae_lens.JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=32),
    "gated": lambda: sae_lens.GatedTrainingSAEConfig(d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3),
    "matryoshka_batchtopk": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, k=4, matryoshka_widths=[8, 32]
    ),
}


def sae_cfg(d_in: int = D_MODEL, d_sae: int = 32) -> StandardTrainingSAEConfig:
    return StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=1e-3)


def multi_cfg(
    tmp_path: Path, saes: dict[str, Any], hook_names: Any, splice: str, **overrides: Any
) -> E2EMultiRunnerConfig[Any]:
    """The fields of conftest's ``make_cfg``, for several SAEs."""
    fields: dict[str, Any] = dict(
        model_name="tiny",
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
    return E2EMultiRunnerConfig(saes=saes, hook_names=hook_names, splice=splice, **fields)  # type: ignore[arg-type]


def multi_runner(tmp_path: Path, saes: dict[str, Any], hooks: Any, splice: str, **kw: Any) -> Any:
    dataset = kw.pop("dataset", None) or token_dataset()
    model = kw.pop("model", None) or tiny_model()
    cfg = multi_cfg(tmp_path, saes, hooks, splice, **kw)
    return E2EMultiSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)


def bare_trainer(runner: E2EMultiSAETrainingRunner) -> E2ETrainer:
    step = StepPass(runner.model, runner.plan, runner.objective, "fixed", runner.positions)
    return E2ETrainer(runner.cfg.to_sae_trainer_config(), runner.saes, iter(()), step, runner.cfg)


def batch(seed: int = 7) -> torch.Tensor:
    return torch.tensor(token_dataset(n_rows=4, seed=seed)["tokens"])


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def normalised_sae_cfg() -> StandardTrainingSAEConfig:
    return StandardTrainingSAEConfig(
        d_in=D_MODEL,
        d_sae=32,
        l1_coefficient=1e-3,
        normalize_activations="expected_average_only_in",
    )


@pytest.mark.parametrize(
    ("splice", "loss", "make_sae", "extra"),
    [
        ("joint", "e2e_downstream", sae_cfg, {}),
        ("joint", "local", sae_cfg, {}),
        ("independent", "e2e", sae_cfg, {}),
        ("joint", "e2e", normalised_sae_cfg, {"n_batches_for_norm_estimate": 3}),
        ("independent", "e2e", sae_cfg, {"seqpos_slice": (1, None), "exclude_special_tokens": [0]}),
    ],
)
def test_one_sae_trains_the_single_runners_weights(
    tmp_path: Path, splice: str, loss: str, make_sae: Any, extra: dict[str, Any]
) -> None:
    common: dict[str, Any] = dict(training_tokens=4 * 4 * CONTEXT, loss=loss, n_eval_batches=0)
    common |= extra
    single = E2ESAETrainingRunner(
        make_cfg(tmp_path / "single", sae_cfg=make_sae(), **common),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    single.run()
    multi = multi_runner(
        tmp_path / "multi", {"only": make_sae()}, "blocks.1.hook_resid_pre", splice, **common
    )
    before = multi.saes["only"].W_dec.detach().clone()
    saes = multi.run()
    assert not torch.equal(saes["only"].W_dec, before), "training changed nothing"
    for (name, a), (_, b) in zip(
        single.sae.state_dict().items(), saes["only"].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "hooks",
    [
        {"mlp0": "blocks.0.hook_mlp_out", "resid2": "blocks.2.hook_resid_pre"},
        # No shared prefix (hook_embed is outside the blocks); heads flattened at hook_z.
        {"z1": "blocks.1.attn.hook_z", "embed": "hook_embed"},
    ],
)
def test_independent_gradients_equal_single_runs_at_each_hook(
    tmp_path: Path, hooks: dict[str, str]
) -> None:
    runner = multi_runner(
        tmp_path,
        {name: sae_cfg() for name in hooks},
        hooks,
        "independent",
        loss="e2e_downstream",
        n_eval_batches=0,
    )
    tokens = batch()
    multi = bare_trainer(runner)
    multi.step_pass.run(tokens, multi.trainers)
    for name, hook in hooks.items():
        single_sae = copy.deepcopy(runner.saes[name])
        single_sae.zero_grad(set_to_none=True)
        single = E2ESAETrainingRunner(
            make_cfg(
                tmp_path / name,
                sae_cfg=sae_cfg(),
                hook_name=hook,
                loss="e2e_downstream",
                n_eval_batches=0,
            ),
            override_model=tiny_model(),
            override_dataset=token_dataset(),
            override_sae=single_sae,
        )
        trainer = single.build_trainer()
        trainer.step_pass.run(tokens, trainer.trainers)  # the gradients, no update
        expected, got = grads(single_sae), grads(runner.saes[name])
        assert expected.keys() == got.keys() and len(got) == 4
        for param in expected:
            assert expected[param].abs().max() > 0, (name, param)
            torch.testing.assert_close(got[param], expected[param], rtol=1e-5, atol=1e-7)
    first = runner.plan.names[0]  # the earliest hook: every block output after it
    assert runner.plan.plans[first].downstream_hooks == tuple(
        f"blocks.{k}.hook_resid_post" for k in range(3)
    )


def test_joint_gradient_equals_a_hand_built_double_splice(tmp_path: Path) -> None:
    hooks = {"late": "blocks.2.hook_resid_pre", "early": "blocks.0.hook_mlp_out"}
    runner = multi_runner(
        tmp_path,
        {"late": sae_cfg(), "early": sae_cfg()},
        hooks,
        "joint",
        kl_coefficient=2.0,
        n_eval_batches=0,
    )
    tokens = batch()
    multi = bare_trainer(runner)
    outputs = multi.step_pass.run(tokens, multi.trainers)
    got = {name: grads(sae) for name, sae in runner.saes.items()}

    model = runner.model
    saes = {name: copy.deepcopy(sae) for name, sae in runner.saes.items()}
    own_terms = []

    def splice(act: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        sae = saes[name]
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=act.reshape(-1, D_MODEL),
                dead_neuron_mask=torch.zeros(32, dtype=torch.bool),
                coefficients={"l1": 1e-3},
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        # local_mse_coefficient=0: every term of the SAE but its local MSE.
        own_terms.append(sum(v for k, v in out.losses.items() if k != "mse_loss"))
        return out.sae_out.reshape(act.shape)

    with torch.no_grad():
        clean = logits_from_final_resid(model, model(tokens, stop_at_layer=3))
    hooks_fns = [(h, lambda a, hook, n=n: splice(a, hook, n)) for n, h in hooks.items()]
    with model.hooks(fwd_hooks=hooks_fns):
        patched = logits_from_final_resid(model, model(tokens, stop_at_layer=3))
    kl = kl_orig_to_patched(clean, patched)
    (2.0 * kl + sum(own_terms)).backward()  # type: ignore[operator]
    for name, sae in saes.items():
        expected = grads(sae)
        assert len(expected) == 4
        for param in expected:
            torch.testing.assert_close(got[name][param], expected[param], rtol=1e-4, atol=1e-7)
    # The early SAE's gradient includes what reaches it through the late SAE's input.
    assert float(outputs["late"].metrics["kl_orig_patched"]) == pytest.approx(
        float(kl.detach()), rel=1e-5
    )
    assert outputs["early"].losses["kl_loss"] == outputs["late"].losses["kl_loss"]


def test_joint_refuses_two_saes_at_one_hook(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"SAEs 'a' and 'b' both sit at.*splice='independent'"):
        multi_runner(tmp_path, {"a": sae_cfg(), "b": sae_cfg()}, "blocks.1.hook_resid_pre", "joint")


def test_a_hook_not_in_the_model_names_the_sae_and_the_closest_hook(tmp_path: Path) -> None:
    hooks = {"a": "blocks.1.hook_resid_pre", "b": "blocks.2.hook_resid_pr"}
    with pytest.raises(ValueError) as error:
        multi_runner(tmp_path, {"a": sae_cfg(), "b": sae_cfg()}, hooks, "independent")
    message = str(error.value)
    assert message.startswith("SAE 'b': hook_names['b']='blocks.2.hook_resid_pr' is not a hook")
    assert "Did you mean 'blocks.2.hook_resid_pre'" in message


def test_a_bad_first_sae_is_named_too(tmp_path: Path) -> None:
    hooks = {"first": "blocks.1.hook_resid_pr", "b": "blocks.2.hook_resid_pre"}
    with pytest.raises(ValueError, match=r"^SAE 'first': hook_names\['first'\]='blocks.1"):
        multi_runner(tmp_path, {"first": sae_cfg(), "b": sae_cfg()}, hooks, "independent")
    hooks = {"first": "blocks.1.hook_resid_pre", "b": "blocks.2.hook_resid_pre"}
    with pytest.raises(ValueError, match=r"^SAE 'first': saes\['first'\].d_in is 8"):
        multi_runner(tmp_path, {"first": sae_cfg(d_in=8), "b": sae_cfg()}, hooks, "joint")


def test_a_width_that_does_not_match_its_hook_names_the_sae_and_the_fix(tmp_path: Path) -> None:
    hooks = {"a": "blocks.1.hook_resid_pre", "z": "blocks.1.attn.hook_z"}
    with pytest.raises(ValueError) as error:
        multi_runner(tmp_path, {"a": sae_cfg(), "z": sae_cfg(d_in=8)}, hooks, "joint")
    message = str(error.value)
    assert message.startswith("SAE 'z': saes['z'].d_in is 8, but the activation at hook_names")
    assert "Set saes['z'].d_in=16" in message


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(hook_names={"a": "blocks.1.hook_resid_pre"}), r"missing: \['b'\]"),
        (dict(saes={}), "not a non-empty mapping"),
        (dict(saes={"../x": sae_cfg()}, hook_names="blocks.1.hook_resid_pre"), "plain folder"),
        (dict(splice="joint", kl_mse_balance="adaptive"), "kl_mse_balance='adaptive'"),
    ],
)
def test_bad_multi_configs_are_refused_before_any_model(
    tmp_path: Path, fields: dict[str, Any], match: str
) -> None:
    args: dict[str, Any] = (
        dict(
            saes={"a": sae_cfg(), "b": sae_cfg()},
            hook_names={"a": "blocks.1.hook_resid_pre", "b": "blocks.2.hook_resid_pre"},
            splice="independent",
        )
        | fields
    )
    saes, hooks, splice = args.pop("saes"), args.pop("hook_names"), args.pop("splice")
    with pytest.raises(ValueError, match=match):
        multi_cfg(tmp_path, saes, hooks, splice, **args)


LOAD_SCRIPT = """
import sys, json
assert "sae_e2e_plugin" not in sys.modules
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1])
meta = sae.cfg.metadata
print(json.dumps({"hook": meta.hook_name, "objective": meta.e2e_objective, "d_in": sae.cfg.d_in}))
"""


def test_each_sae_exports_to_its_folder_loadable_by_plain_sae_lens(tmp_path: Path) -> None:
    hooks = {"l1": "blocks.1.hook_resid_pre", "l2": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path,
        {"l1": sae_cfg(), "l2": sae_cfg()},
        hooks,
        "joint",
        training_tokens=2 * 4 * CONTEXT,
        n_eval_batches=2,
    )
    runner.run()
    out = Path(runner.cfg.output_path)
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    for name, hook in hooks.items():
        result = subprocess.run(
            [sys.executable, str(script), str(out / name)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        loaded = json.loads(result.stdout)
        other = next(n for n in hooks if n != name)
        assert loaded["hook"] == hook and loaded["d_in"] == D_MODEL
        assert loaded["objective"]["splice"] == "joint"
        assert loaded["objective"]["other_saes"] == {other: hooks[other]}
        evaluation = json.loads((out / name / "eval.json").read_text())
        assert evaluation["hook_name"] == hook and evaluation["n_sequences"] == 8
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["l1/kl_loss"] == rows[0]["l2/kl_loss"] > 0


def test_a_multi_run_holds_its_output_path(tmp_path: Path) -> None:
    saes = {"l1": sae_cfg(), "l2": sae_cfg()}
    hooks = {"l1": "blocks.1.hook_resid_pre", "l2": "blocks.2.hook_resid_pre"}
    runner = multi_runner(tmp_path, saes, hooks, "independent", training_tokens=4 * CONTEXT)
    output = Path(runner.cfg.output_path)
    # Another holder of the folder (as a second process would be) refuses the run untouched.
    with hold_folder(output, "output_path"), pytest.raises(FolderInUseError, match="output_path"):
        runner.run()
    assert sorted(p.name for p in output.iterdir()) == [LOCK_FILENAME]
    assert set(runner.run()) == {"l1", "l2"}


def test_resume_ends_with_the_same_weights_for_every_sae(tmp_path: Path) -> None:
    dataset = token_dataset(n_rows=64, seed=5)
    saes = {"a": sae_cfg(), "b": sae_cfg()}
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    common: dict[str, Any] = dict(
        training_tokens=6 * 4 * CONTEXT,
        n_checkpoints=1,
        lr_scheduler_name="cosineannealing",
        lr_decay_steps=6,
        n_eval_batches=0,
        dataset=dataset,
    )
    full = multi_runner(tmp_path / "full", saes, hooks, "independent", **common)
    full.run()
    (checkpoint,) = [p for p in Path(full.cfg.checkpoint_path).iterdir() if p.is_dir()]
    assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == ["a", "b"]
    resumed = multi_runner(
        tmp_path / "resumed",
        saes,
        hooks,
        "independent",
        resume_from_checkpoint=str(checkpoint.parent),
        **common,
    )
    resumed.run()
    assert resumed.trainer.n_steps_taken == full.trainer.n_steps_taken == 6
    for name in saes:
        for (key, a), (_, b) in zip(
            full.saes[name].state_dict().items(),
            resumed.saes[name].state_dict().items(),
            strict=True,
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
        lr = resumed.trainer.trainers[name].optimizer.param_groups[0]["lr"]
        assert lr == full.trainer.trainers[name].optimizer.param_groups[0]["lr"]


def test_resuming_with_other_saes_is_refused(tmp_path: Path) -> None:
    hooks = {"a": "blocks.1.hook_resid_pre", "b": "blocks.2.hook_resid_pre"}
    common: dict[str, Any] = dict(
        training_tokens=4 * 4 * CONTEXT, n_checkpoints=1, n_eval_batches=0
    )
    full = multi_runner(tmp_path / "a", {"a": sae_cfg(), "b": sae_cfg()}, hooks, "joint", **common)
    full.run()
    (checkpoint,) = [p for p in Path(full.cfg.checkpoint_path).iterdir() if p.is_dir()]
    # Refused before anything runs: the checkpoint's config names the changed field.
    with pytest.raises(ValueError, match=r"splice: 'joint' -> 'independent'"):
        multi_runner(
            tmp_path / "b",
            {"a": sae_cfg(), "b": sae_cfg()},
            hooks,
            "independent",
            resume_from_checkpoint=str(checkpoint),
            **common,
        )
    # A checkpoint of other SAEs, its config record gone: its own state names them.
    (checkpoint / "runner_cfg.json").unlink()
    other = multi_runner(
        tmp_path / "c",
        {"a": sae_cfg(), "b": sae_cfg()},
        hooks,
        "independent",
        resume_from_checkpoint=str(checkpoint),
        **common,
    )
    with pytest.raises(ValueError, match=r"spliced 'joint'; this run has .* spliced 'independent'"):
        other.run()


def test_joint_evaluation_equals_a_hand_spliced_computation(tmp_path: Path) -> None:
    hooks = {"a": "blocks.0.hook_mlp_out", "b": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        hooks,
        "joint",
        training_tokens=2 * 4 * CONTEXT,
        n_eval_batches=2,
    )
    runner.run()
    out = Path(runner.cfg.output_path)
    saes = {name: sae_lens.SAE.load_from_disk(str(out / name)) for name in hooks}
    tokens = torch.tensor(token_dataset(n_rows=8, seed=11)["tokens"])
    result = evaluate_sae(saes, runner.model, tokens.split(4))
    assert isinstance(result, JointEvalResult)

    model, l0 = runner.model, {name: 0.0 for name in hooks}
    fired = {name: torch.zeros(sae.cfg.d_sae, dtype=torch.bool) for name, sae in saes.items()}

    def splice(act: torch.Tensor, hook: Any, name: str) -> torch.Tensor:
        features = saes[name].encode(act)
        l0[name] += float((features != 0).sum())
        fired[name] |= (features != 0).flatten(0, 1).any(0)
        return saes[name].decode(features)

    def ce(logits: torch.Tensor, part: torch.Tensor) -> float:
        targets = part[:, 1:].reshape(-1)
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), targets, reduction="sum"))

    ce_clean = ce_spliced = ce_zeroed = kl = kl_zeroed = later_sq = 0.0
    later = "blocks.2.hook_resid_post"  # the one residual-stream hook after the latest SAE
    with torch.no_grad():
        for part in tokens.split(4):
            clean, cache = model.run_with_cache(part, names_filter=later)
            fns = [(h, lambda a, hook, n=n: splice(a, hook, n)) for n, h in hooks.items()]
            with model.hooks(fwd_hooks=fns):
                spliced, spliced_cache = model.run_with_cache(part, names_filter=later)
            with model.hooks(
                fwd_hooks=[(h, lambda a, hook: torch.zeros_like(a)) for h in hooks.values()]
            ):
                zeroed = model(part)
            ce_clean, ce_spliced, ce_zeroed = (
                total + ce(logits, part)
                for total, logits in ((ce_clean, clean), (ce_spliced, spliced), (ce_zeroed, zeroed))
            )
            kl += float(kl_orig_to_patched(clean, spliced)) * part.numel()
            kl_zeroed += float(kl_orig_to_patched(clean, zeroed)) * part.numel()
            later_sq += float((spliced_cache[later] - cache[later]).pow(2).sum())
    n_predicted = 8 * (CONTEXT - 1)
    assert result.ce_loss_clean == pytest.approx(ce_clean / n_predicted, rel=1e-5)
    assert result.ce_loss_spliced == pytest.approx(ce_spliced / n_predicted, rel=1e-5)
    # Every SAE's activation zeroed together: the suite's zero ablation.
    assert result.ce_loss_zero_ablation == pytest.approx(ce_zeroed / n_predicted, rel=1e-5)
    assert result.kl_orig_ablated == pytest.approx(kl_zeroed / (8 * CONTEXT), rel=1e-4)
    assert result.kl_score == pytest.approx(1 - kl / kl_zeroed, rel=1e-4)
    assert list(result.downstream) == [later]
    mse = later_sq / (8 * CONTEXT * D_MODEL)
    assert result.downstream[later].mse == pytest.approx(mse, rel=1e-4) and mse > 0
    assert result.alive_features == {name: int(f.sum()) for name, f in fired.items()}
    # The splice changed the output (on this random model it may lower the CE loss as well as
    # raise it, so only the KL has a sign).
    assert result.kl_orig_patched == pytest.approx(kl / (8 * CONTEXT), rel=1e-4)
    assert result.kl_orig_patched > 1e-4
    assert result.ce_loss_spliced != pytest.approx(result.ce_loss_clean, rel=1e-4)
    for name in hooks:
        assert result.l0[name] == pytest.approx(l0[name] / (8 * CONTEXT), rel=1e-6)
    # The run wrote the same kind of evaluation of its held-out tokens.
    written = json.loads((out / "joint_eval.json").read_text())
    assert written["hook_names"] == hooks and written["n_tokens"] == 8 * CONTEXT
    assert runner.joint_eval is not None and written["l0"] == runner.joint_eval.l0


MULTI_YAML = """
splice: joint
loss: e2e_downstream
lr: 1e-3
dataset_path: x
context_size: 16
train_batch_size_tokens: 64
saes:
  early: {architecture: topk, d_in: 16, d_sae: 64, k: 4}
  late: {d_in: 16, d_sae: 32, l1_coefficient: 2e-3}
hook_names: {early: blocks.0.hook_resid_post, late: blocks.2.hook_resid_pre}
logger: {log_to_wandb: false}
"""


def test_cli_reads_saes_and_hook_names_from_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "multi.yaml"
    config.write_text(MULTI_YAML)
    code = main(["train", "--config", str(config), "--saes.early.k", "8", "--print-config"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["splice"] == "joint" and printed["lr"] == 0.001
    assert printed["saes"]["early"]["architecture"] == "topk"
    assert printed["saes"]["early"]["k"] == 8
    assert printed["saes"]["late"]["l1_coefficient"] == 0.002
    assert printed["hook_names"]["late"] == "blocks.2.hook_resid_pre"
    again = E2EMultiRunnerConfig.from_dict(printed)
    assert isinstance(again.saes["early"], sae_lens.TopKTrainingSAEConfig)
    assert again.saes["early"].k == 8 and again.saes["late"].l1_coefficient == 0.002
    assert again.hook_names_per_sae == printed["hook_names"] and again.splice == "joint"
    assert again.sae is again.saes["early"] and again.hook_name == "blocks.0.hook_resid_post"

    built: list[Any] = []

    class Recorder:
        context = SINGLE_PROCESS
        full_disk = False

        def __init__(self, cfg: Any) -> None:
            self.cfg = cfg
            built.append(cfg)

        def run(self) -> None:
            if self.full_disk:
                raise DiskFullError("no space left on the device to write the checkpoint.")

        def export_folders(self) -> dict[str, str]:
            return {name: str(Path(self.cfg.output_path) / name) for name in self.cfg.saes}

    monkeypatch.setattr(multi_runner_module, "E2EMultiSAETrainingRunner", Recorder)
    assert main(["train", "--config", str(config), "--output_path", str(tmp_path / "o")]) == 0
    (cfg,) = built
    assert isinstance(cfg, E2EMultiRunnerConfig) and list(cfg.saes) == ["early", "late"]
    out = capsys.readouterr().out
    assert f"saved SAE 'late' (SAELens format) to {tmp_path / 'o' / 'late'}" in out
    # A full disk ends in one line that says which checkpoint the same command resumes from,
    # as for one SAE.
    Recorder.full_disk = True
    assert main(["train", "--config", str(config), "--output_path", str(tmp_path / "o")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("the checkpoint. No checkpoint of this run was written."), last


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--saes.early.d_sea", "3"], "--saes.early.d_sea is not a field"),
        (["--saes.late.architecture", "nope"], "saes.late.architecture='nope'"),
        (["--sae.d_in", "16"], "sae and saes are both set"),
        (["--hook_name", "blocks.1.hook_resid_pre"], "hook_name is derived"),
    ],
)
def test_cli_names_the_bad_sae_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    config = tmp_path / "multi.yaml"
    config.write_text(MULTI_YAML)
    assert main(["train", "--config", str(config), *flags, "--print-config"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("splice", ["joint", "independent"])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_trains_in_both_modes_and_exports(
    tmp_path: Path, architecture: str, splice: str
) -> None:
    saes = {"first": ARCHITECTURES[architecture](), "second": ARCHITECTURES[architecture]()}
    hooks = {"first": "blocks.0.hook_resid_post", "second": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path, saes, hooks, splice, training_tokens=2 * 4 * CONTEXT, n_eval_batches=1
    )
    before = {name: sae.W_dec.detach().clone() for name, sae in runner.saes.items()}
    trained = runner.run()
    for name in hooks:
        assert trained[name].cfg.architecture() == architecture
        assert not torch.equal(trained[name].W_dec, before[name]), name
        loaded = sae_lens.SAE.load_from_disk(str(Path(runner.cfg.output_path) / name))
        assert loaded(torch.randn(3, D_MODEL)).shape == (3, D_MODEL)
        assert math.isfinite(runner.eval_results[name].ce_loss_increase)


def test_joint_checkpoint_blocks_recomputes_the_blocks_without_an_sae_inside_and_keeps_the_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hooks = {"a": "blocks.0.hook_mlp_out", "b": "blocks.1.hook_resid_pre"}
    got = {}
    calls: list[int] = []
    real = multi_splice.checkpoint

    def counting(fn: Any, model: Any, prefix: Any, layer: int, *args: Any, **kw: Any) -> Any:
        calls.append(layer)
        return real(fn, model, prefix, layer, *args, **kw)

    monkeypatch.setattr(multi_splice, "checkpoint", counting)
    for blocks in (False, True):
        runner = multi_runner(
            tmp_path / str(blocks),
            {"a": sae_cfg(), "b": sae_cfg()},
            hooks,
            "joint",
            model=tiny_model(n_layers=4),
            checkpoint_blocks=blocks,
            loss="e2e_downstream",
            n_eval_batches=0,
        )
        trainer = bare_trainer(runner)
        trainer.step_pass.run(batch(), trainer.trainers)
        got[blocks] = {name: grads(sae) for name, sae in runner.saes.items()}
    # Block 0 holds an SAE inside (at its MLP's output) and runs plainly; b reads the residual
    # stream entering block 1, so b runs before the block and the block is still recomputed.
    assert calls == [1, 2, 3]
    for name in hooks:
        for param, value in got[False][name].items():
            torch.testing.assert_close(got[True][name][param], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("splice", ["joint", "independent"])
def test_a_bf16_model_trains_float32_saes_on_selected_positions(
    tmp_path: Path, splice: str
) -> None:
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        hooks,
        splice,
        lm_dtype="bfloat16",
        seqpos_slice=(2, None),
        training_tokens=2 * 4 * CONTEXT,
        n_eval_batches=1,
    )
    runner.run()
    assert runner.model.W_E.dtype == torch.bfloat16
    for name, sae in runner.saes.items():
        assert all(p.dtype == torch.float32 for p in sae.parameters()), name
        assert all(torch.isfinite(p).all() for p in sae.parameters()), name
        # Two of the 8 positions are never read: the dead-feature statistics count 6 per row.
        assert runner.trainer.trainers[name].n_frac_active_samples == 2 * 4 * 6
        assert runner.eval_results[name].n_spliced == 4 * 6


def test_sigint_finishes_the_step_checkpoints_every_sae_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = token_dataset(n_rows=64, seed=2)
    saes = {"a": sae_cfg(), "b": sae_cfg()}
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    common: dict[str, Any] = dict(
        training_tokens=5 * 4 * CONTEXT, n_eval_batches=0, dataset=dataset
    )
    real_step = E2ETrainer.step

    def sigint_during_third_step(trainer: E2ETrainer, tokens: torch.Tensor) -> Any:
        output = real_step(trainer, tokens)
        if trainer.n_steps_taken == 3:
            signal.raise_signal(signal.SIGINT)  # handled: the step finishes, then training stops
        return output

    monkeypatch.setattr(E2ETrainer, "step", sigint_during_third_step)
    interrupted = multi_runner(tmp_path / "a", saes, hooks, "joint", **common)
    with pytest.raises(KeyboardInterrupt) as stopped:
        interrupted.run()
    checkpoint = stopped.value.checkpoint  # type: ignore[attr-defined]
    assert checkpoint is not None and checkpoint.name == str(3 * 4 * CONTEXT)
    monkeypatch.setattr(E2ETrainer, "step", real_step)
    resumed = multi_runner(
        tmp_path / "b", saes, hooks, "joint", resume_from_checkpoint=str(checkpoint), **common
    )
    resumed.run()
    uninterrupted = multi_runner(tmp_path / "c", saes, hooks, "joint", **common)
    uninterrupted.run()
    for name in saes:
        for (key, a), (_, b) in zip(
            uninterrupted.saes[name].state_dict().items(),
            resumed.saes[name].state_dict().items(),
            strict=True,
        ):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_an_earlier_runs_sae_folder_is_refused_or_replaced_whole(tmp_path: Path) -> None:
    hooks = {"a": "blocks.1.hook_resid_pre", "b": "blocks.2.hook_resid_pre"}
    saes = {"a": sae_cfg(), "b": sae_cfg()}
    common: dict[str, Any] = dict(training_tokens=4 * CONTEXT, n_eval_batches=1)
    multi_runner(tmp_path, saes, hooks, "independent", **common).run()
    stale = tmp_path / "output" / "b" / "eval.json"
    assert stale.is_file()
    (tmp_path / "output" / "runner_cfg.json").unlink()  # the SAE folder alone still counts
    with pytest.raises(ValueError, match=r"output_path='.*/output/a' holds a previous run"):
        multi_runner(tmp_path, saes, hooks, "independent", **common)
    again = multi_runner(
        tmp_path, saes, hooks, "independent", overwrite_output=True, eval_at_end=False, **common
    )
    again.run()
    assert not stale.exists() and (tmp_path / "output" / "b" / "cfg.json").is_file()


@pytest.mark.parametrize(
    ("hooks", "splice", "fields", "match"),
    [
        (
            {"a": "blocks.0.hook_resid_pre", "last": "blocks.2.hook_resid_post"},
            "independent",
            dict(loss="e2e_downstream"),
            r"SAE 'last' at hook 'blocks.2.hook_resid_post' has no residual-stream hook after it",
        ),
        (
            {"a": "blocks.0.hook_resid_pre", "b": "blocks.1.hook_resid_pre"},
            "joint",
            dict(loss="e2e_downstream", downstream_hooks=["blocks.0.hook_resid_post"]),
            r"SAE 'b': downstream_hooks contains 'blocks.0.hook_resid_post', which runs at or "
            r"before hook_names\['b'\]='blocks.1.hook_resid_pre'",
        ),
    ],
)
def test_downstream_hooks_that_cannot_be_compared_name_the_sae(
    tmp_path: Path, hooks: dict[str, str], splice: str, fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        multi_runner(tmp_path, {name: sae_cfg() for name in hooks}, hooks, splice, **fields)


def test_sae_or_unknown_override_saes_are_refused(tmp_path: Path) -> None:
    hooks = {"a": "blocks.0.hook_resid_pre", "b": "blocks.1.hook_resid_pre"}
    with pytest.raises(ValueError, match=r"sae is set on an E2EMultiRunnerConfig"):
        multi_cfg(tmp_path, {"a": sae_cfg()}, hooks["a"], "joint", sae=sae_cfg())
    cfg = multi_cfg(tmp_path, {"a": sae_cfg(), "b": sae_cfg()}, hooks, "joint")
    with pytest.raises(ValueError, match=r"E2EMultiRunnerConfig \(several SAEs\); train it with"):
        E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())
    stray = TrainingSAE.from_dict(sae_cfg().to_dict())
    with pytest.raises(ValueError, match=r"override_saes names SAEs \['c'\]"):
        E2EMultiSAETrainingRunner(cfg, override_model=tiny_model(), override_saes={"c": stray})


def test_evaluation_during_training_measures_each_sae_and_the_joint_suite(tmp_path: Path) -> None:
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        hooks,
        "joint",
        training_tokens=4 * 4 * CONTEXT,
        n_eval_batches=1,
        eval_every_n_steps=2,
    )
    runner.run()
    seen = [(step, name) for step, name, _ in runner.eval_history]
    during = [(2, "a"), (2, "b"), (2, "joint"), (4, "a"), (4, "b"), (4, "joint")]
    assert seen == during + [(4, "a"), (4, "b"), (4, "joint")]  # then the exported SAEs'
    # After the last step the training SAEs are the exported ones: the same numbers.
    last_joint = runner.eval_history[len(during) - 1][2]
    assert runner.joint_eval is not None
    assert last_joint.kl_orig_patched == pytest.approx(runner.joint_eval.kl_orig_patched, rel=1e-5)


def test_independent_saes_at_one_hook_train_as_separate_runs(tmp_path: Path) -> None:
    # Two copies of one SAE at one hook: independent splices cannot tell them apart.
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        "blocks.1.hook_resid_pre",
        "independent",
        training_tokens=3 * 4 * CONTEXT,
        n_eval_batches=0,
    )
    runner.saes["b"].load_state_dict(runner.saes["a"].state_dict())
    before = runner.saes["a"].W_enc.detach().clone()
    runner.run()
    assert not torch.equal(runner.saes["a"].W_enc, before)
    for (key, a), (_, b) in zip(
        runner.saes["a"].state_dict().items(), runner.saes["b"].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), key


def test_wandb_rows_carry_every_sae_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    calls: dict[str, list[Any]] = {"init": [], "log": [], "finish": []}
    monkeypatch.setattr(wandb, "init", lambda **kw: calls["init"].append(kw))
    monkeypatch.setattr(wandb, "log", lambda row, step: calls["log"].append((step, row)))
    monkeypatch.setattr(wandb, "finish", lambda: calls["finish"].append(True))
    uploads: list[str] = []
    monkeypatch.setattr(wandb, "log_artifact", lambda art, aliases=None: uploads.append(art.name))
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        hooks,
        "joint",
        training_tokens=4 * 4 * CONTEXT,
        n_eval_batches=1,
        n_checkpoints=0,
        logger=LoggingConfig(log_to_wandb=True, wandb_log_frequency=2, wandb_project="p"),
    )
    runner.run()
    (init,) = calls["init"]
    assert init["project"] == "p" and init["config"]["splice"] == "joint"
    assert calls["finish"] == [True]
    # Each SAE's export is uploaded under its own name (weights, then sparsity).
    names = [runner.saes[n].get_name() for n in hooks]
    assert names[0] != names[1]
    assert uploads == [names[0], f"{names[0]}_log_feature_sparsity"] + [
        names[1],
        f"{names[1]}_log_feature_sparsity",
    ]
    train_rows = [(step, row) for step, row in calls["log"] if "a/losses/kl_loss" in row]
    assert [step for step, _ in train_rows] == [1, 3]  # every second step
    for _, row in train_rows:
        assert row["a/losses/kl_loss"] == row["b/losses/kl_loss"] > 0
        assert row["b/metrics/l0"] >= 0 and row["a/details/n_training_samples"] > 0
    evals = {key: value for _, row in calls["log"] for key, value in row.items() if "/eval/" in key}
    assert evals["joint/eval/kl_orig_patched"] == pytest.approx(runner.joint_eval.kl_orig_patched)
    assert evals["joint/eval/l0/b"] == pytest.approx(runner.joint_eval.l0["b"])
    assert evals["a/eval/ce_loss_increase"] == pytest.approx(
        runner.eval_results["a"].ce_loss_increase
    )


@pytest.mark.parametrize("splice", ["joint", "independent"])
def test_compile_kl_reaches_the_kl_of_both_splices(
    tmp_path: Path, splice: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compiling needs a C++ compiler and tens of seconds; the flag's path is what is checked.
    from sae_e2e_plugin.core import losses
    from sae_e2e_plugin.training import objectives

    seen: list[bool] = []
    real = losses.chunked_kl_orig_to_patched

    def recording(*args: Any, compile_kernel: bool = False, **kw: Any) -> Any:
        seen.append(compile_kernel)
        return real(*args, compile_kernel=False, **kw)

    # Both splices reach the KL through the objective (joint: its joint form).
    monkeypatch.setattr(objectives, "chunked_kl_orig_to_patched", recording)
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    runner = multi_runner(
        tmp_path,
        {"a": sae_cfg(), "b": sae_cfg()},
        hooks,
        splice,
        compile_kl=True,
        n_eval_batches=0,
    )
    trainer = bare_trainer(runner)
    trainer.step_pass.run(batch(), trainer.trainers)
    assert seen == ([True] if splice == "joint" else [True, True])


def test_independent_saes_share_the_clean_log_probs_with_the_same_gradients(
    tmp_path: Path,
) -> None:
    # The clean head runs once per step instead of once per SAE; the numbers do not change.
    hooks = {"a": "blocks.0.hook_resid_post", "b": "blocks.2.hook_resid_pre"}
    runner = multi_runner(tmp_path, {"a": sae_cfg(), "b": sae_cfg()}, hooks, "independent")
    rows: list[int] = []
    runner.model.ln_final.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[:-1].numel())
    )
    tokens = batch()
    results = {}
    for share in (True, False):
        rows.clear()
        trainer = bare_trainer(runner)
        trainer.step_pass.share_clean_log_probs = share
        for sae in runner.saes.values():
            sae.zero_grad(set_to_none=True)
        outputs = trainer.step_pass.run(tokens, trainer.trainers)
        kls = {name: out.metrics["kl_orig_patched"] for name, out in outputs.items()}
        results[share] = (sum(rows), kls, {n: grads(s) for n, s in runner.saes.items()})
    n_tokens = tokens.numel()
    # Forward passes of the head: the clean one once or per SAE, plus each SAE's patched one.
    assert results[True][0] == 3 * n_tokens and results[False][0] == 4 * n_tokens
    assert results[True][1] == results[False][1]
    for name in hooks:
        for param, grad in results[True][2][name].items():
            assert grad.abs().max() > 0
            assert torch.equal(grad, results[False][2][name][param]), (name, param)
