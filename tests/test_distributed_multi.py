"""Several SAEs per run, data-parallel: two gloo processes train the SAEs one process trains.

Launched as in ``test_distributed`` (ranks spawned as torchrun would, one thread each); one
launch trains every case, and each case is compared with the same run in this process. Same
tolerance and reason as there (the ranks sum in another order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import CONTEXT, tiny_model, token_dataset
from test_distributed import SEQUENCES, STEPS, TOLERANCE, launch, wait_for
from test_multi_sae import ARCHITECTURES, multi_cfg

from sae_e2e_plugin import E2EMultiSAETrainingRunner
from sae_e2e_plugin.training.loop.checkpoints import complete_checkpoints

HOOKS = {"a": "blocks.0.hook_resid_post", "b": "blocks.1.hook_resid_post"}
# name: (splice, architectures of "a" and "b", config fields)
CASES: dict[str, tuple[str, tuple[str, str], dict[str, Any]]] = {
    "independent-downstream": (
        "independent",
        ("standard", "batchtopk"),
        {"loss": "e2e_downstream"},
    ),
    "joint": ("joint", ("batchtopk", "standard"), {"loss": "e2e"}),
    # Two local steps (each rank its share of the multi-hook buffer's rows), then two e2e.
    # Batch top-k sits at the later hook: the tiny model's blocks.0 output repeats rows (same
    # first token), and a tie at the global cut-off keeps every tied value (see distributed.md).
    "independent-phased": (
        "independent",
        ("standard", "batchtopk"),
        {"e2e_fraction": 0.5},
    ),
    # The most frequent ids: the two ranks' shares then hold different numbers of rows.
    "joint-excluding": (
        "joint",
        ("standard", "standard"),
        {"exclude_special_tokens": [0, 1, 2, 3]},
    ),
}

WORKER = """
import os, sys, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from test_distributed_multi import CASES, runner_for
from sae_e2e_plugin.training.loop.checkpoints import complete_checkpoints
from sae_e2e_plugin.training.parallel.distributed import launcher_context, shutdown

out, rank = Path(sys.argv[2]), int(os.environ["RANK"])
for case in [*CASES, "independent-downstream-resumed"]:
    resume = None
    if case.endswith("-resumed"):  # the first case again, from its checkpoint, in two ranks
        (resume,) = complete_checkpoints(out / "independent-downstream" / "checkpoints")
    runner = runner_for(out / case, case.removesuffix("-resumed"), resume)
    saes = runner.run()
    trainer = runner.trainer
    torch.save(
        {name: {"sae": sae.state_dict(),
                "act_freq_scores": trainer.trainers[name].act_freq_scores,
                "n_frac_active_samples": trainer.trainers[name].n_frac_active_samples,
                "last_losses": trainer.last_losses[name]}
         for name, sae in saes.items()},
        out / f"{case}-rank{rank}.pt",
    )
shutdown(launcher_context())
"""


def runner_for(folder: Path, case: str, resume: Path | None = None) -> E2EMultiSAETrainingRunner:
    """The case's runner (the same in every rank and in this process)."""
    splice, archs, fields = CASES[case]
    saes = {name: ARCHITECTURES[arch]() for name, arch in zip(HOOKS, archs, strict=True)}
    cfg = multi_cfg(
        folder,
        saes,
        HOOKS,
        splice,
        training_tokens=STEPS * SEQUENCES * CONTEXT,
        n_checkpoints=1,
        resume_from_checkpoint=None if resume is None else str(resume),
        **fields,
    )
    # tiny_model() seeds torch; the runner seeds it again before building the SAEs.
    return E2EMultiSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks_multi")
    wait_for(launch(out, "train", worker=WORKER))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_the_saes_one_process_trains(
    two_ranks: Path, tmp_path: Path, case: str
) -> None:
    rank0 = torch.load(two_ranks / f"{case}-rank0.pt")
    rank1 = torch.load(two_ranks / f"{case}-rank1.pt")
    one = runner_for(tmp_path, case)
    initial = {name: sae.W_enc.detach().clone() for name, sae in one.saes.items()}
    one.run()
    assert one.trainer is not None
    for name in HOOKS:
        # Both ranks hold the same SAE and statistics ...
        for key, value in rank0[name]["sae"].items():
            assert torch.equal(value, rank1[name]["sae"][key]), (name, key)
        assert torch.equal(rank0[name]["act_freq_scores"], rank1[name]["act_freq_scores"])
        # ... which is what one process trains on the same global batches ...
        reference = one.saes[name].state_dict()
        assert rank0[name]["sae"].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(rank0[name]["sae"][key], value, **TOLERANCE, msg=key)
        # ... after training moved it.
        assert (reference["W_enc"] - initial[name]).abs().max() > 1e-3, name
        trainer = one.trainer.trainers[name]
        assert rank0[name]["n_frac_active_samples"] == trainer.n_frac_active_samples
        all_rows = STEPS * SEQUENCES * CONTEXT
        assert (trainer.n_frac_active_samples == all_rows) == ("excluding" not in case)
        torch.testing.assert_close(rank0[name]["act_freq_scores"], trainer.act_freq_scores)
        expected_losses = one.trainer.last_losses[name]
        assert rank0[name]["last_losses"] == pytest.approx(expected_losses, rel=1e-4)


def test_rank_zero_alone_writes_each_saes_export_the_log_and_checkpoint(two_ranks: Path) -> None:
    for case in CASES:
        output = two_ranks / case / "output"
        rows = [
            json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        (checkpoint,) = complete_checkpoints(two_ranks / case / "checkpoints")
        assert sorted(p.name for p in checkpoint.iterdir() if p.is_dir()) == sorted(HOOKS)
        rank0 = torch.load(two_ranks / f"{case}-rank0.pt")
        for name in HOOKS:
            loaded = sae_lens.SAE.load_from_disk(str(output / name))
            assert loaded.cfg.metadata.hook_name == HOOKS[name]
            cosine = torch.cosine_similarity(
                loaded.state_dict()["W_dec"], rank0[name]["sae"]["W_dec"], dim=-1
            )
            torch.testing.assert_close(cosine, torch.ones_like(cosine))
            assert json.loads((output / name / "eval.json").read_text())["l0"] > 0
        assert (output / "joint_eval.json").is_file() == case.startswith("joint")
    # The worker's stdout/err files are the only ones written outside the runs' folders.
    assert not [p for p in os.listdir(two_ranks) if p.endswith(".tmp")]


def test_a_two_rank_checkpoint_of_several_saes_resumes_to_the_uninterrupted_saes(
    two_ranks: Path,
) -> None:
    uninterrupted = torch.load(two_ranks / "independent-downstream-rank0.pt")
    for rank in (0, 1):
        resumed = torch.load(two_ranks / f"independent-downstream-resumed-rank{rank}.pt")
        for name in HOOKS:
            for key, value in resumed[name]["sae"].items():
                expected = uninterrupted[name]["sae"][key]
                torch.testing.assert_close(value, expected, **TOLERANCE, msg=key)
