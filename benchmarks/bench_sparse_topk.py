"""A TopK SAE's training forward and backward pass alone: SAELens' dense one against
``core.sparse_topk`` (``sparse_topk=True``, the default of an e2e step).

One process, the two alternating round by round on the same SAE and rows: each round times
``--repeats`` forward + backward passes of each (the loss plus a fixed linear read-out of the
reconstruction, as the e2e objective adds one) and keeps their median. Prints one JSON line
per round and a summary line: milliseconds of each, their ratio, and the largest relative
difference of any parameter's gradient between the two.

    python benchmarks/bench_sparse_topk.py                       # 1,024 rows, SmolLM2's bench SAE
    python benchmarks/bench_sparse_topk.py --dead-fraction 0.3   # with the auxiliary loss
    python benchmarks/bench_sparse_topk.py --quick               # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import machine, package_version
from sae_lens import TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE

from sae_e2e_plugin.core.sparse_topk import sparse_topk_training_forward


def build(args: argparse.Namespace) -> tuple[TopKTrainingSAE, TrainStepInput, torch.Tensor]:
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k))
    with torch.no_grad():  # decoder rows of unequal norm, as after some training
        sae.W_dec.mul_(torch.rand(args.d_sae, 1) + 0.5)
    dead = torch.rand(args.d_sae) < args.dead_fraction if args.dead_fraction > 0 else None
    inputs = TrainStepInput(
        sae_in=torch.randn(args.rows, args.d_in),
        dead_neuron_mask=dead,
        coefficients={},
        n_training_steps=0,
        is_logging_step=False,
    )
    return sae, inputs, torch.randn(args.rows, args.d_in)


def pass_of(sae: TopKTrainingSAE, forward: Callable[..., Any], inputs: Any, readout: Any) -> Any:
    def one() -> dict[str, torch.Tensor]:
        sae.zero_grad(set_to_none=True)
        output = forward(inputs)
        (output.loss + (output.sae_out * readout).sum()).backward()
        return {name: p.grad for name, p in sae.named_parameters() if p.grad is not None}

    return one


def median_ms(one: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="tokens in the batch (8 × 128)")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dead-fraction", type=float, default=0.0, help="latents marked dead")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny SAE, one round (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.rows, args.d_in, args.d_sae, args.k, args.rounds, args.repeats = 16, 8, 32, 3, 1, 1
    sae, inputs, readout = build(args)
    dense = pass_of(sae, sae.training_forward_pass, inputs, readout)
    sparse = pass_of(sae, lambda x: sparse_topk_training_forward(sae, x), inputs, readout)
    want = {name: g.clone() for name, g in dense().items()}
    got = sparse()
    grad_difference = max(float((got[n] - g).abs().max() / g.abs().max()) for n, g in want.items())
    settings = {k: getattr(args, k) for k in ("rows", "d_in", "d_sae", "k", "dead_fraction")}
    rounds = []
    for index in range(args.rounds):
        row = {"round": index, "dense_ms": median_ms(dense, args.repeats)}
        row["sparse_ms"] = median_ms(sparse, args.repeats)
        rounds.append(row)
        print(json.dumps({"benchmark": "sparse_topk", **settings, **row}), flush=True)
    dense_ms = statistics.median(r["dense_ms"] for r in rounds)
    sparse_ms = statistics.median(r["sparse_ms"] for r in rounds)
    summary = {
        "benchmark": "sparse_topk_summary",
        **settings,
        "dense_ms_median": round(dense_ms, 2),
        "sparse_ms_median": round(sparse_ms, 2),
        "dense_over_sparse": round(dense_ms / sparse_ms, 3),
        "max_relative_grad_difference": grad_difference,
        "threads": torch.get_num_threads(),
        "machine": machine("cpu"),
        **package_version(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
