"""Time steps of several e2e SAEs: one multi-SAE run against one single run per SAE.

One process measures one mode (so its peak memory is its own), on the GPT-2-small-shaped model
with random weights (``common.gpt2_shaped_model``), one standard SAE with 16 × d_model features
at ``blocks.<layer>.hook_resid_pre`` for each ``--layers`` entry, and identical random token
batches. A timed step trains every SAE once on the batch:

- ``--mode independent``: ``E2ETrainer.step`` with ``splice="independent"`` (shared
  prefix up to the earliest SAE and one clean run; each SAE's own continuation);
- ``--mode joint``: the same with ``splice="joint"`` (one patched run, one KL);
- ``--mode singles``: one single-SAE run's ``E2ETrainer.step`` per SAE on the same batch, one after the other
  (what N separate runs compute per batch; their separate processes would also each hold the
  model, which this mode does not count).

Prints one JSON object: tokens/s (tokens of the batch per second of a step that trains every
SAE), each step's seconds, peak resident memory. Issue 16's target: ``independent`` at most
0.8 × the time of ``singles`` for layers 2, 6, 10 at 4 × 128 tokens::

    python benchmarks/bench_multi.py --mode singles     --layers 2 6 10 --batch 4 --seq 128
    python benchmarks/bench_multi.py --mode independent --layers 2 6 10 --batch 4 --seq 128
    python benchmarks/bench_multi.py --mode joint       --layers 2 6 10 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DICT_RATIO,
    OtherLoad,
    bare_trainer,
    gpt2_shaped_model,
    machine,
    one_step,
    package_version,
    peak_rss_bytes,
    step_only_fields,
    token_batches,
)

LR = 5e-4
SPARSITY_COEFF = 1.5
MAX_GRAD_NORM = 10.0


def config_fields(args: argparse.Namespace, d_model: int) -> dict[str, Any]:
    """The fields every run of this benchmark shares (as ``bench_step.py``'s plugin side)."""
    return dict(
        model_name="gpt2-small-shaped-random",
        lr=LR,
        device="cpu",
        loss="e2e",
        max_grad_norm=MAX_GRAD_NORM,
        **step_only_fields(args.batch, args.seq, args.steps + args.warmup, args.seed),
    ) | ({"lm_dtype": args.lm_dtype} if args.lm_dtype else {})


def sae_config(d_model: int) -> Any:
    from sae_lens import StandardTrainingSAEConfig

    return StandardTrainingSAEConfig(
        d_in=d_model,
        d_sae=DICT_RATIO * d_model,
        l1_coefficient=SPARSITY_COEFF / d_model,
        apply_b_dec_to_input=False,
    )


def multi_step_fn(args: argparse.Namespace) -> tuple[Callable[[torch.Tensor], float], int]:
    from sae_e2e_plugin import E2EMultiRunnerConfig

    model = gpt2_shaped_model(args.seed, args.shape)
    d_model = model.cfg.d_model
    names = [f"layer{layer}" for layer in args.layers]
    cfg = E2EMultiRunnerConfig(
        saes={name: sae_config(d_model) for name in names},
        hook_names={
            name: f"blocks.{layer}.hook_resid_pre"
            for name, layer in zip(names, args.layers, strict=True)
        },
        splice=args.mode,
        **config_fields(args, d_model),
    )
    trainer = bare_trainer(cfg, model, args.batch)

    def step(tokens: torch.Tensor) -> float:
        outputs = one_step(trainer, tokens)
        return float(sum(float(out.loss.detach()) for out in outputs.values()))

    return step, model.cfg.d_vocab


def singles_step_fn(args: argparse.Namespace) -> tuple[Callable[[torch.Tensor], float], int]:
    from sae_e2e_plugin import E2ERunnerConfig

    model = gpt2_shaped_model(args.seed, args.shape)
    d_model = model.cfg.d_model
    trainers = []
    for layer in args.layers:
        cfg = E2ERunnerConfig(
            sae=sae_config(d_model),
            hook_name=f"blocks.{layer}.hook_resid_pre",
            **config_fields(args, d_model),
        )
        trainers.append(bare_trainer(cfg, model, args.batch))

    def step(tokens: torch.Tensor) -> float:
        total = 0.0
        for trainer in trainers:
            (output,) = one_step(trainer, tokens).values()
            total += float(output.loss.detach())
        return total

    return step, model.cfg.d_vocab


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("independent", "joint", "singles"), required=True)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 6, 10])
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lm-dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--shape", choices=("gpt2-small", "tiny"), default="gpt2-small")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--seed", type=int, default=0, help="model weights seed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "mode": args.mode,
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "shape": args.shape,
        "lm_dtype": args.lm_dtype or "auto",
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": machine(),
        **package_version(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }
    build = singles_step_fn if args.mode == "singles" else multi_step_fn
    start = time.perf_counter()
    step, vocab = build(args)
    result["setup_s"] = round(time.perf_counter() - start, 3)
    batches = token_batches(args.warmup + args.steps, args.batch, args.seq, vocab)
    for i in range(args.warmup):
        step(batches[i])
    seconds, losses = [], []
    with OtherLoad() as other:
        for i in range(args.warmup, args.warmup + args.steps):
            began = time.perf_counter()
            losses.append(step(batches[i]))
            seconds.append(time.perf_counter() - began)
    total = sum(seconds)
    result.update(
        status="ok",
        step_s=[round(s, 4) for s in seconds],
        tokens_per_s=round(args.batch * args.seq * args.steps / total, 2) if total else None,
        losses=[round(x, 6) for x in losses],
        peak_rss_gib=round(peak_rss_bytes() / 2**30, 3),
        other_cpu_fraction=other.fraction,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
