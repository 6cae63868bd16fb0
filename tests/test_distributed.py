"""Data-parallel training: two gloo processes on the CPU train the SAE one process trains.

The test spawns ranks as `torchrun` would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set,
one thread each). One launch trains every case below; the tests compare its files with runs
in this (single) process on the same global batch and seed.

Tolerance: the ranks sum their gradients and statistics in another order than one process
does, so the SAEs agree to float32 rounding, not bit for bit: rtol=1e-4, atol=1e-6 after
K=4 steps (measured differences are ~1e-7).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset

from sae_e2e_plugin import (
    E2ESAETrainingRunner,
    ObjectiveInputs,
    ObjectiveOutput,
    StandardTrainingTranscoderConfig,
    register_objective,
)
from sae_e2e_plugin.training.loop.checkpoints import complete_checkpoints
from sae_e2e_plugin.training.parallel.distributed import (
    SINGLE_PROCESS,
    DistributedContext,
    check_shardable,
    launcher_context,
    rank_share,
    resolve_backend,
    setup_distributed,
)

TESTS = Path(__file__).parent
STEPS = 4
SEQUENCES = 4  # make_cfg's global batch: 4 sequences of CONTEXT tokens, 2 per rank
TOLERANCE: dict[str, Any] = dict(rtol=1e-4, atol=1e-6)

SAE_CONFIGS: dict[str, Any] = {
    "standard": lambda: sae_lens.StandardTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3
    ),
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=3),
    "matryoshka_batchtopk": lambda: sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, k=3, matryoshka_widths=[8, 32]
    ),
    "jumprelu": lambda: sae_lens.JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=32),
    "topk": lambda: sae_lens.TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=3),
    "transcoder": lambda: StandardTrainingTranscoderConfig(
        d_in=D_MODEL, d_out=D_MODEL, d_sae=32, l1_coefficient=1e-3, skip_connection=True
    ),
}
# (architecture, variant): the variant is the loss, or e2e on positions chosen by token id.
CASES = [(arch, loss) for arch in ("standard", "batchtopk") for loss in ("e2e", "e2e_downstream")]
CASES += [("matryoshka_batchtopk", "e2e"), ("jumprelu", "e2e"), ("topk", "e2e")]
CASES += [("standard", "e2e-phased"), ("batchtopk", "e2e-phased")]
CASES += [("standard", v) for v in ("e2e-excluding", "e2e-blocks", "e2e-bf16", "e2e-normalised")]
CASES += [("transcoder", "e2e-mlp"), ("transcoder", "e2e-mlp-phased")]  # block 1's MLP replaced

WORKER = """
import json, os, sys, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from conftest import make_cfg, tiny_model, token_dataset
from test_distributed import SAE_CONFIGS, CASES, run_config
from sae_e2e_plugin import E2ESAETrainingRunner
from sae_e2e_plugin.training.loop.checkpoints import complete_checkpoints
from sae_e2e_plugin.training.parallel.distributed import launcher_context, shutdown

out, mode = sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
cases = CASES + [("standard", "e2e-resumed")] if mode == "train" else [("standard", mode)]
for arch, loss in cases:
    name = f"{arch}-{loss}"
    fields = run_config(loss.removesuffix("-resumed"), mode)
    if loss.endswith("-resumed"):  # standard-e2e again, from its checkpoint, in two ranks
        (checkpoint,) = complete_checkpoints(Path(out) / "standard-e2e" / "checkpoints")
        fields["resume_from_checkpoint"] = str(checkpoint)
    cfg = make_cfg(Path(out) / name, sae_cfg=SAE_CONFIGS[arch](), **fields)
    runner = E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())
    export = runner.save_final_sae
    def counted(*args, **kwargs):
        with open(os.path.join(out, f"{name}-exports.txt"), "a") as f:
            f.write(f"{rank}\\n")
        return export(*args, **kwargs)
    runner.save_final_sae = counted
    sae = runner.run()
    trainer = runner.trainer.trainers["sae"]
    torch.save(
        {"sae": sae.state_dict(), "act_freq_scores": trainer.act_freq_scores,
         "n_frac_active_samples": trainer.n_frac_active_samples,
         "last_losses": runner.trainer.last_losses["sae"]},
        os.path.join(out, f"{name}-rank{rank}.pt"),
    )
shutdown(launcher_context())
"""


def _rank_one_dies(inputs: ObjectiveInputs) -> ObjectiveOutput:
    # Rank 1 is killed (as by the OOM killer) in its second step; rank 0 carries on.
    if os.environ.get("RANK") == "1" and next(_calls) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return ObjectiveOutput(losses={"recon": inputs.reconstruction.pow(2).mean()}, metrics={})


def _rank_zero_interrupted(inputs: ObjectiveInputs) -> ObjectiveOutput:
    # Ctrl-C reaches rank 0 alone, in its second step.
    if os.environ.get("RANK") == "0" and next(_calls) == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return ObjectiveOutput(losses={"recon": inputs.reconstruction.pow(2).mean()}, metrics={})


_calls = itertools.count()
register_objective("test_rank_one_dies", _rank_one_dies, needs_full_run=False)
register_objective("test_rank_zero_interrupted", _rank_zero_interrupted, needs_full_run=False)


def run_config(loss: str, mode: str) -> dict[str, Any]:
    """The config fields of a case (shared by the ranks and the single-process run)."""
    fields: dict[str, Any] = dict(
        loss=loss, training_tokens=STEPS * SEQUENCES * CONTEXT, n_checkpoints=1
    )
    if loss == "e2e-excluding":
        # The most frequent ids: the two ranks' shares then hold different numbers of rows.
        fields |= dict(loss="e2e", exclude_special_tokens=[0, 1, 2, 3])
    elif loss == "e2e-phased":  # two local steps on SAELens' activation buffer, then two e2e
        fields |= dict(loss="e2e", e2e_fraction=0.5)
    elif loss == "e2e-blocks":
        fields |= dict(loss="e2e", checkpoint_blocks=True)
    elif loss == "e2e-bf16":
        fields |= dict(loss="e2e", lm_dtype="bfloat16")
    elif loss == "e2e-normalised":
        # The scaling factor is estimated from the same (global) batches on every rank.
        sae = SAE_CONFIGS["standard"]()
        sae.normalize_activations = "expected_average_only_in"
        fields |= dict(loss="e2e", sae=sae, n_batches_for_norm_estimate=2)
    elif loss.startswith("e2e-mlp"):
        fields |= dict(loss="e2e", hook_name="blocks.1.ln2.hook_normalized")
        fields |= dict(hook_name_out="blocks.1.hook_mlp_out")
        if loss.endswith("-phased"):  # the local phase on (input, MLP output) pairs
            fields["e2e_fraction"] = 0.5
    if mode == "die":
        fields |= dict(loss="test_rank_one_dies", distributed_timeout_s=20.0, n_checkpoints=0)
    if mode == "interrupt":
        fields |= dict(loss="test_rank_zero_interrupted", n_checkpoints=0)
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    out: Path, mode: str, world_size: int = 2, worker: str = WORKER
) -> list[subprocess.Popen[str]]:
    """Start ``world_size`` ranks of ``worker``, as torchrun would, one thread each."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "worker.py"
    script.write_text(worker)
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = os.environ | {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(TESTS), str(out), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def wait_for(procs: list[subprocess.Popen[str]], timeout: float = 300) -> None:
    """Every rank ends with exit status 0 (its stderr in the failure message otherwise)."""
    try:
        for rank, proc in enumerate(procs):
            _, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"rank {rank} failed:\n{err[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of two ranks training every case; the folder of their files."""
    out = tmp_path_factory.mktemp("two_ranks")
    wait_for(launch(out, "train"))
    return out


def single_process_run(
    tmp_path: Path, arch: str, loss: str
) -> tuple[E2ESAETrainingRunner, dict[str, torch.Tensor]]:
    """The case trained in this process; the runner and its SAE's initial state."""
    cfg = make_cfg(tmp_path, sae_cfg=SAE_CONFIGS[arch](), **run_config(loss, "train"))
    # tiny_model() seeds torch, so the SAE built next starts as the ranks' SAE does.
    runner = E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )
    initial = {k: v.detach().clone() for k, v in runner.sae.state_dict().items()}
    runner.run()
    return runner, initial


@pytest.mark.parametrize(("arch", "loss"), CASES)
def test_two_ranks_train_the_sae_one_process_trains(
    two_ranks: Path, tmp_path: Path, arch: str, loss: str
) -> None:
    name = f"{arch}-{loss}"
    rank0 = torch.load(two_ranks / f"{name}-rank0.pt")
    rank1 = torch.load(two_ranks / f"{name}-rank1.pt")
    one, one_init = single_process_run(tmp_path, arch, loss)
    assert one.trainer is not None
    # Both ranks hold exactly the same SAE and statistics (same reduced numbers, same ops).
    for key, value in rank0["sae"].items():
        assert torch.equal(value, rank1["sae"][key]), key
    assert torch.equal(rank0["act_freq_scores"], rank1["act_freq_scores"])
    # ...which is the one-process SAE after the same global batches.
    reference = one.sae.state_dict()
    assert rank0["sae"].keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(rank0["sae"][key], value, **TOLERANCE, msg=key)
    # ...and training moved it (equal SAEs that never trained would prove nothing).
    assert (reference["W_enc"] - one_init["W_enc"]).abs().max() > 1e-3
    # Firing statistics count the global batch's rows, as one process does.
    assert rank0["n_frac_active_samples"] == one.trainer.trainers["sae"].n_frac_active_samples
    all_rows = STEPS * SEQUENCES * CONTEXT
    assert rank0["n_frac_active_samples"] == all_rows or loss == "e2e-excluding"
    torch.testing.assert_close(
        rank0["act_freq_scores"], one.trainer.trainers["sae"].act_freq_scores
    )
    # The logged loss terms are the global means.
    assert rank0["last_losses"] == pytest.approx(one.trainer.last_losses["sae"], rel=1e-4)
    if "batchtopk" in arch:
        assert reference["topk_threshold"] > 0


def test_rank_zero_alone_writes_the_export_log_and_checkpoint(two_ranks: Path) -> None:
    for arch, loss in CASES:
        run = two_ranks / f"{arch}-{loss}"
        assert (two_ranks / f"{arch}-{loss}-exports.txt").read_text().split() == ["0"]
        output = run / "output"
        rows = [
            json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        phased = loss.endswith("-phased")
        phases = ["local", "local", "e2e", "e2e"] if phased else ["e2e"] * STEPS
        assert [r["phase"] for r in rows] == phases
        assert json.loads((output / "eval.json").read_text())["l0"] > 0
        (checkpoint,) = complete_checkpoints(run / "checkpoints")
        assert int(checkpoint.name) in [k * SEQUENCES * CONTEXT for k in range(1, STEPS)]
        # The export loads in plain SAELens (batch top-k as JumpReLU) and matches the rank's SAE.
        loaded = sae_lens.SAE.load_from_disk(str(output))
        exported_as = {"matryoshka_batchtopk": "jumprelu", "transcoder": "skip_transcoder"}
        expected = {"batchtopk": "jumprelu", **exported_as}.get(arch, arch)
        assert loaded.cfg.architecture() == expected
        rank0 = torch.load(two_ranks / f"{arch}-{loss}-rank0.pt")["sae"]
        # The export folds the decoder norms into the encoder: compare directions.
        cosine = torch.cosine_similarity(loaded.state_dict()["W_dec"], rank0["W_dec"], dim=-1)
        torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_a_two_rank_checkpoint_resumes_to_the_uninterrupted_sae_in_two_ranks_or_one(
    two_ranks: Path, tmp_path: Path
) -> None:
    uninterrupted = torch.load(two_ranks / "standard-e2e-rank0.pt")["sae"]
    for rank in (0, 1):
        resumed = torch.load(two_ranks / f"standard-e2e-resumed-rank{rank}.pt")["sae"]
        for key, value in resumed.items():
            torch.testing.assert_close(value, uninterrupted[key], **TOLERANCE, msg=key)
    # One process continues the two ranks' checkpoint: the stream position is global.
    (checkpoint,) = complete_checkpoints(two_ranks / "standard-e2e" / "checkpoints")
    cfg = make_cfg(
        tmp_path,
        sae_cfg=SAE_CONFIGS["standard"](),
        resume_from_checkpoint=str(checkpoint),
        **run_config("e2e", "train"),
    )
    runner = E2ESAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )
    runner.run()
    for key, value in runner.sae.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[key], **TOLERANCE, msg=key)


def test_killing_one_rank_stops_the_other_with_a_message(tmp_path: Path) -> None:
    procs = launch(tmp_path, "die")
    try:
        procs[1].communicate(timeout=120)  # drains its pipes while it runs
        died = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        after = time.monotonic() - died
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[1].returncode == -9  # killed (SIGKILL) in its second step
    assert procs[0].returncode == 1
    assert "PeerFailure" in err and "rank 0 of 2" in err, err[-3000:]
    assert "another rank failed" in err
    # Rank 0 stopped on the closed connection, well within distributed_timeout_s=20 (~2 s).
    assert after < 15


def test_a_batch_that_cannot_be_shared_in_whole_sequences_is_refused() -> None:
    three = DistributedContext(rank=1, world_size=3, local_rank=1)
    with pytest.raises(ValueError, match=r"4 sequences per step.*3 processes.*multiple of"):
        check_shardable(4, three)
    two = DistributedContext(rank=1, world_size=2, local_rank=1)
    tokens = torch.arange(4 * CONTEXT).view(4, CONTEXT)
    assert torch.equal(rank_share(tokens, two), tokens[2:])
    assert rank_share(tokens, SINGLE_PROCESS) is tokens


def test_the_launcher_environment_decides_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_context() == SINGLE_PROCESS
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT is not.*torchrun"):
        launcher_context()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher_context() == DistributedContext(rank=3, world_size=4, local_rank=1)
    assert resolve_backend("auto", "cpu") == "gloo"
    assert resolve_backend("auto", "cuda:0") == "nccl"
    with pytest.raises(ValueError, match="distributed_backend='nccl' needs device='cuda'"):
        resolve_backend("nccl", "cpu")
    # Refused before any process group is joined.
    with pytest.raises(ValueError, match=r"device='cuda:1' puts every rank on one GPU"):
        setup_distributed("auto", 60.0, "cuda:1")
    with pytest.raises(ValueError, match=r"distributed_timeout_s must be .* > 0, got 0"):
        setup_distributed("gloo", 0, "cpu")


def test_one_process_without_a_launcher_is_unchanged(tmp_path: Path) -> None:
    # No launcher: no process group, the plain trainer, the same weights run after run.
    for name in ("RANK", "WORLD_SIZE"):
        assert name not in os.environ
    runs = [single_process_run(tmp_path / str(i), "standard", "e2e")[0] for i in range(2)]
    assert all(r.trainer is not None and r.trainer.context is None for r in runs)
    assert all(type(r.trainer.trainers["sae"]).__name__ == "E2ESAETrainer" for r in runs)  # type: ignore[union-attr]
    assert runs[0].context == SINGLE_PROCESS
    for key, value in runs[0].sae.state_dict().items():
        assert torch.equal(value, runs[1].sae.state_dict()[key]), key


def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_with_a_checkpoint(
    tmp_path: Path,
) -> None:
    procs = launch(tmp_path / "ranks", "interrupt")
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode != 0 for proc in procs), outputs
    assert all("TrainingInterrupted" in err for _, err in outputs), outputs[1][1][-2000:]
    # Both ranks finished step 2 and stopped before step 3; rank 0 wrote the checkpoint.
    run = tmp_path / "ranks" / "standard-interrupt"
    (checkpoint,) = complete_checkpoints(run / "checkpoints")
    assert int(checkpoint.name) == 2 * SEQUENCES * CONTEXT
    # Resumed (here in one process), the run ends where an uninterrupted one does.
    fields = run_config("e2e", "interrupt")
    standard = SAE_CONFIGS["standard"]()
    resumed = E2ESAETrainingRunner(
        make_cfg(
            tmp_path / "resumed", sae_cfg=standard, resume_from_checkpoint=str(checkpoint), **fields
        ),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    resumed.run()
    whole = E2ESAETrainingRunner(
        make_cfg(tmp_path / "whole", sae_cfg=standard, **fields),
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    whole.run()
    for key, value in whole.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[key], value, **TOLERANCE, msg=key)


def test_the_command_line_reports_a_failed_peer_in_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sae_e2e_plugin.cli import main
    from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner as Runner
    from sae_e2e_plugin.training.parallel.distributed import PeerFailure

    def without_a_model(self: Runner, cfg: Any) -> None:
        self.context = SINGLE_PROCESS

    def peer_fails(self: Runner) -> None:
        raise PeerFailure("rank 0 of 2: averaging gradients failed because another rank failed")

    monkeypatch.setattr(Runner, "__init__", without_a_model)
    monkeypatch.setattr(Runner, "run", peer_fails)
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset_path: x\ncontext_size: 16\ntrain_batch_size_tokens: 64\n"
        "sae: {architecture: standard, d_in: 16, d_sae: 64}\nlogger: {log_to_wandb: false}\n"
    )
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "sae-e2e train: error: rank 0 of 2: averaging gradients failed because another rank failed"
    )


def test_ranks_other_than_zero_log_nothing_to_wandb(tmp_path: Path) -> None:
    from sae_e2e_plugin.runs.runner import trainer_config_for_rank

    cfg = make_cfg(tmp_path, logger=sae_lens.LoggingConfig(log_to_wandb=True))
    assert trainer_config_for_rank(cfg, main=True).logger.log_to_wandb is True
    assert trainer_config_for_rank(cfg, main=False).logger.log_to_wandb is False
    assert cfg.logger.log_to_wandb is True  # the run's own config is left as it was
