"""Every pair of options trained together at least once, a few steps each, so that no pair of
features is first tried by a user: objective × architecture × schedule × positions × several
SAEs × model family (a covering array of all pairs, built greedily and checked complete here).

Each run must train (every SAE's weights move, every logged loss is finite) and export SAEs
that plain SAELens loads with their hook and positions recorded."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, tiny_model, token_dataset
from sae_lens.load_model import HookedProxyLM
from test_multi_hf import hf_fields, llama

from sae_e2e_plugin import (
    E2EMultiRunnerConfig,
    E2EMultiSAETrainingRunner,
    E2ERunnerConfig,
    E2ESAETrainingRunner,
)

FACTORS: dict[str, tuple[Any, ...]] = {
    "loss": ("local", "e2e", "e2e_downstream"),
    "arch": ("standard", "topk", "batchtopk", "jumprelu"),
    "e2e_fraction": (1.0, 0.5),
    "positions": ("all", "from-1"),
    "saes": ("one", "joint", "independent"),
    "family": ("HookedTransformer", "AutoModelForCausalLM"),
}
STEPS = 4
HOOKS = {
    "HookedTransformer": ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
    "AutoModelForCausalLM": ("model.layers.0", "model.layers.1"),
}


def sae_config(arch: str) -> Any:
    if arch == "standard":
        return sae_lens.StandardTrainingSAEConfig(d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3)
    if arch == "topk":
        return sae_lens.TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4)
    if arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4)
    return sae_lens.JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=32)


REFUSED = {(("loss", "local"), ("e2e_fraction", 0.5))}
"""Pairs refused by design, up front and by name (a local objective has no e2e phase)."""


def all_pairs() -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    names = list(FACTORS)
    pairs = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in FACTORS[a]
        for vb in FACTORS[b]
    }
    return pairs - REFUSED


def pairs_of(case: dict[str, Any]) -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(list(FACTORS), 2)}


def covering_cases() -> list[dict[str, Any]]:
    """A small set of cases covering every pair: greedy, deterministic (the first best case)."""
    uncovered = all_pairs()
    every = [
        dict(zip(FACTORS, values, strict=True)) for values in itertools.product(*FACTORS.values())
    ]
    every = [case for case in every if not pairs_of(case) & REFUSED]
    cases = []
    while uncovered:
        best = max(every, key=lambda case: len(pairs_of(case) & uncovered))
        cases.append(best)
        uncovered -= pairs_of(best)
    return cases


CASES = covering_cases()


def test_the_cases_cover_every_pair_of_options() -> None:
    covered = set().union(*(pairs_of(case) for case in CASES))
    assert covered == all_pairs()
    # Far fewer runs than every combination (3 × 4 × 2 × 2 × 3 × 2 = 288).
    assert len(CASES) < 20 < math.prod(len(v) for v in FACTORS.values())


def test_the_refused_pair_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"e2e_fraction=0.5 with loss='local'"):
        _runner(tmp_path, CASES[0] | {"loss": "local", "e2e_fraction": 0.5})


def _runner(tmp_path: Path, case: dict[str, Any]) -> Any:
    hf = case["family"] == "AutoModelForCausalLM"
    fields = hf_fields(tmp_path) if hf else _ht_fields(tmp_path)
    fields |= {
        "loss": case["loss"],
        "e2e_fraction": case["e2e_fraction"],
        "training_tokens": STEPS * 4 * CONTEXT,
        "n_batches_in_buffer": 8,
    }
    if case["positions"] == "from-1":
        fields["seqpos_slice"] = (1, None)
    # As SAELens loads a Hugging Face model (its store runs it for the local phase's buffer).
    model = HookedProxyLM(llama(), tokenizer=None) if hf else tiny_model()  # type: ignore[arg-type]
    first, second = HOOKS[case["family"]]
    if case["saes"] == "one":
        cfg = E2ERunnerConfig(sae=sae_config(case["arch"]), hook_name=second, **fields)
        return E2ESAETrainingRunner(cfg, override_model=model, override_dataset=token_dataset())
    cfg = E2EMultiRunnerConfig(
        saes={"a": sae_config(case["arch"]), "b": sae_config("standard")},  # type: ignore[arg-type]
        hook_names={"a": first, "b": second},
        splice=case["saes"],
        **fields,
    )
    return E2EMultiSAETrainingRunner(cfg, override_model=model, override_dataset=token_dataset())


def _ht_fields(tmp_path: Path) -> dict[str, Any]:
    return hf_fields(tmp_path) | {
        "model_name": "tiny",
        "model_class_name": "HookedTransformer",
        "lr": 3e-3,
    }


@pytest.mark.parametrize(
    "case", CASES, ids=["-".join(str(v) for v in case.values()) for case in CASES]
)
def test_every_pair_of_options_trains_and_exports(tmp_path: Path, case: dict[str, Any]) -> None:
    runner = _runner(tmp_path, case)
    several = runner.trains_several_saes
    before = {name: _state(sae) for name, sae in runner.saes.items()}
    runner.run()
    assert runner.trainer is not None
    losses = runner.trainer.last_losses
    values = [v for terms in losses.values() for v in terms.values()]
    assert values and all(math.isfinite(v) for v in values), losses
    for name, sae in runner.saes.items():
        moved = [k for k, v in _state(sae).items() if not torch.equal(v, before[name][k])]
        assert moved, f"SAE {name!r} did not train"
        loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "output" / (name if several else "")))
        seqpos = (1, None) if case["positions"] == "from-1" else (None,)
        assert tuple(loaded.cfg.metadata.seqpos_slice or (None,)) == seqpos
        assert loaded.cfg.metadata.hook_name == (
            HOOKS[case["family"]][1] if name in ("sae", "b") else HOOKS[case["family"]][0]
        )


def _state(sae: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}
