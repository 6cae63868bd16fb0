"""``fused_adam``: torch's fused Adam kernel updates the SAE as Adam's formula does, a run uses
the kernel its config names, and a resumed run uses its own config's kernel, whichever kernel
wrote the checkpoint (``training.loop.adam_kernel``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONTEXT, make_cfg, tiny_model, token_dataset
from sae_lens.constants import TRAINER_STATE_FILENAME

from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.runs.output_folder import LOCK_FILENAME
from sae_e2e_plugin.training.loop.adam_kernel import choose_adam_kernel, fused_adam_unsupported
from sae_e2e_plugin.training.loop.checkpoints import ResumeError
from sae_e2e_plugin.training.loop.sae_trainer import E2ESAETrainer

LR, BETAS, EPS = 3e-3, (0.9, 0.999), 1e-8
STEP_TOKENS = 4 * CONTEXT


def adam_by_hand(start: torch.Tensor, grads: list[torch.Tensor], lr: float = LR) -> torch.Tensor:
    """Adam (Kingma & Ba, Algorithm 1) in float64, one update per gradient."""
    param = start.double().clone()
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    b1, b2 = BETAS
    for t, grad in enumerate(grads, start=1):
        g = grad.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        param = param - lr * m_hat / (v_hat.sqrt() + EPS)
    return param


@pytest.mark.parametrize("fused", [True, False])
def test_each_kernel_computes_adams_update_by_hand(fused: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(64, 96, generator=generator)
    grads = [torch.randn(64, 96, generator=generator) * scale for scale in (1.0, 1e-3, 30.0)]
    param = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([param], lr=LR, betas=BETAS)  # as SAETrainer builds it
    assert choose_adam_kernel(optimizer, fused) is fused
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    assert optimizer.param_groups[0]["fused"] is (True if fused else None)
    expected = adam_by_hand(start, grads)
    assert (param.detach().double() - start.double()).abs().max() > 5e-3  # it moved
    torch.testing.assert_close(param.detach().double(), expected, rtol=0, atol=1e-6)


def test_the_two_kernels_differ_by_rounding_only() -> None:
    generator = torch.Generator().manual_seed(1)
    start = torch.randn(256, 256, generator=generator)
    grads = [torch.randn(256, 256, generator=generator) for _ in range(5)]
    results = []
    for fused in (True, False):
        param = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.Adam([param], lr=LR, betas=BETAS)
        choose_adam_kernel(optimizer, fused)
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        results.append(param.detach().clone())
    fused_weights, loop_weights = results
    assert not torch.equal(fused_weights, loop_weights)  # another order of float operations
    torch.testing.assert_close(fused_weights, loop_weights, rtol=0, atol=1e-6)


def test_parameters_without_a_fused_kernel_keep_torchs_default() -> None:
    # torch has no fused Adam for the meta device (nor, before torch 2.4, for CPUs).
    param = torch.nn.Parameter(torch.zeros(3, 4, device="meta"))
    reason = fused_adam_unsupported([param])
    assert reason is not None and "meta" in reason
    optimizer = torch.optim.Adam([param], lr=LR)
    assert choose_adam_kernel(optimizer, True) is False
    assert optimizer.param_groups[0]["fused"] is None
    assert fused_adam_unsupported([torch.nn.Parameter(torch.zeros(3))]) is None


def runner(tmp_path: Path, **overrides: Any) -> E2ESAETrainingRunner:
    fields: dict[str, Any] = dict(
        training_tokens=4 * STEP_TOKENS, n_eval_batches=0, n_checkpoints=1
    )
    cfg = make_cfg(tmp_path, **(fields | overrides))
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def kernels_used(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The param groups' kernel flag and the step counter's dtype at every e2e update."""
    seen: list[Any] = []
    finish = E2ESAETrainer.finish_e2e_step

    def recording(self: E2ESAETrainer, output: Any) -> Any:
        result = finish(self, output)
        steps = {str(s["step"].dtype) for s in self.optimizer.state.values()}
        seen.append(({g["fused"] for g in self.optimizer.param_groups}, steps))
        return result

    monkeypatch.setattr(E2ESAETrainer, "finish_e2e_step", recording)
    return seen


@pytest.mark.parametrize(("written_by", "resumed_with"), [(True, False), (False, True)])
def test_a_resumed_run_uses_its_own_configs_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written_by: bool, resumed_with: bool
) -> None:
    first = runner(tmp_path / "first", fused_adam=written_by)
    first.run()
    assert first.cfg.checkpoint_path is not None
    (checkpoint,) = Path(first.cfg.checkpoint_path).iterdir()
    saved = torch.load(checkpoint / TRAINER_STATE_FILENAME, weights_only=False)
    assert saved["optimizer"]["param_groups"][0]["fused"] is (True if written_by else None)

    seen = kernels_used(monkeypatch)
    resumed = runner(
        tmp_path / "resumed", fused_adam=resumed_with, resume_from_checkpoint=str(checkpoint)
    )
    resumed.run()
    assert 0 < len(seen) < 4  # only the steps after the checkpoint
    assert all(flags == {True if resumed_with else None} for flags, _ in seen), seen
    assert all(dtypes == {"torch.float32"} for _, dtypes in seen), seen
    # The resumed run ends where the uninterrupted run of the first kernel ends, to rounding.
    end, resumed_end = first.sae.state_dict(), resumed.sae.state_dict()
    for key, value in end.items():
        torch.testing.assert_close(resumed_end[key], value, rtol=0, atol=1e-5, msg=key)


def test_a_run_uses_the_kernel_its_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = kernels_used(monkeypatch)
    runner(tmp_path / "fused", n_checkpoints=0).run()
    runner(tmp_path / "loop", n_checkpoints=0, fused_adam=False).run()
    assert [flags for flags, _ in seen] == [{True}] * 4 + [{None}] * 4


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("maximize", True),
        ("weight_decay", 0.1),
        ("betas", (0.5, 0.9)),
        ("betas", torch.tensor([0.9, 0.999])),
        ("initial_lr", 1.0),
    ],
)
def test_a_checkpoint_with_other_adam_settings_is_refused_by_name(
    tmp_path: Path, setting: str, value: Any
) -> None:
    # Loading an optimizer's state takes every setting from the file: a changed one would train
    # something else (maximize=True: the loss upwards) without a word.
    first = runner(tmp_path / "first")
    first.run()
    (checkpoint,) = Path(first.cfg.checkpoint_path or "").iterdir()
    state_file = checkpoint / TRAINER_STATE_FILENAME
    state = torch.load(state_file, weights_only=True)
    ours = state["optimizer"]["param_groups"][0][setting]
    state["optimizer"]["param_groups"][0][setting] = value
    torch.save(state, state_file)
    resumed = runner(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ResumeError) as refused:
        resumed.run()
    message = str(refused.value)
    assert str(state_file) in message
    assert f"{setting}: {ours!r} here, {value!r} in the checkpoint" in message
    written = [p.name for p in (tmp_path / "resumed" / "output").iterdir()]
    assert written == [LOCK_FILENAME]  # refused before training, checkpoints or exports


def test_a_trainer_state_of_another_shape_is_named_as_damaged(tmp_path: Path) -> None:
    first = runner(tmp_path / "first")
    first.run()
    (checkpoint,) = Path(first.cfg.checkpoint_path or "").iterdir()
    state_file = checkpoint / TRAINER_STATE_FILENAME
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "optimizer": [1, 2]}, state_file)
    resumed = runner(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError) as refused:
        resumed.run()
    message = str(refused.value)
    assert "a file in it is damaged" in message and str(checkpoint) in message
