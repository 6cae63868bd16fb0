"""Data-parallel scaling: e2e training tokens/s with 1, 2, ... processes at the same global batch.

For each process count the script starts ``torchrun --nproc_per_node N`` on itself
(``--worker``); every rank trains with ``E2ESAETrainingRunner`` (gloo on CPUs, nccl on GPUs),
rank 0's ``training_log.jsonl`` gives each step's wall time, and the script prints one JSON
line per process count (tokens/s over the timed steps) and the scaling efficiency
``tokens/s(N) / (N × tokens/s(1))``. The global batch is the same for every N, so every N
trains the same SAE (docs/distributed.md).

    # CPU, one thread per process (2 cores), the bundled SmolLM2-135M and Shakespeare:
    python benchmarks/bench_distributed.py --nprocs 1 2 --threads-total 2 \\
        --out benchmarks/results/distributed_cpu.jsonl
    # one node with GPUs (NCCL):
    python benchmarks/bench_distributed.py --nprocs 1 2 4 8 --device cuda --batch 32 --seq 1024 \\
        --out benchmarks/results/distributed_gpu.jsonl

``--model gpt2-small`` (or ``tiny``) uses the GPT-2-shaped random model of ``common.py`` and
random tokens instead of the bundled model and corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument(
        "--model", choices=("smollm2-135m", "gpt2-small", "tiny"), default="smollm2-135m"
    )
    p.add_argument("--batch", type=int, default=8, help="global batch, sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--layer", type=int, default=6, help="SAE at blocks.<layer>.hook_resid_pre")
    p.add_argument("--dict-ratio", type=int, default=16, help="d_sae / d_model")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    p.add_argument("--threads-total", type=int, default=2, help="CPU threads shared by the ranks")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_and_tokens(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and a pre-tokenized dataset of ``--seq``-token rows."""
    from datasets import Dataset

    if args.model == "smollm2-135m":
        from sae_e2e_plugin import load_builtin_dataset, load_builtin_model

        model = load_builtin_model("smollm2-135m")
        rows = load_builtin_dataset("shakespeare", model.tokenizer, args.seq, split="train")
        return model, rows
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import gpt2_shaped_model

    model = gpt2_shaped_model(seed=0, shape=args.model)
    n_rows = args.batch * (args.warmup + args.steps) + 64
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_rows, args.seq), generator=generator)
    return model, Dataset.from_dict({"tokens": tokens.tolist()})


def worker(args: argparse.Namespace) -> None:
    """One rank: train ``warmup + steps`` steps; rank 0 writes the training log."""
    import sae_lens
    import torch

    from sae_e2e_plugin import E2ERunnerConfig, E2ESAETrainingRunner

    torch.manual_seed(0)
    model, dataset = model_and_tokens(args)
    d_model = model.cfg.d_model
    steps = args.warmup + args.steps
    cfg = E2ERunnerConfig(
        sae=sae_lens.StandardTrainingSAEConfig(
            d_in=d_model, d_sae=args.dict_ratio * d_model, l1_coefficient=1e-3
        ),
        model_name="benchmark",
        hook_name=f"blocks.{args.layer}.hook_resid_pre",
        dataset_path="unused",
        is_dataset_tokenized=True,
        context_size=args.seq,
        prepend_bos=False,
        train_batch_size_tokens=args.batch * args.seq,
        training_tokens=steps * args.batch * args.seq,
        n_batches_in_buffer=2,
        store_batch_size_prompts=args.batch,
        n_eval_batches=0,
        eval_at_end=False,
        n_checkpoints=0,
        device=args.device,
        output_path=str(args.worker),
        overwrite_output=True,
        verbose=False,
        logger=sae_lens.LoggingConfig(log_to_wandb=False),
    )
    E2ESAETrainingRunner(cfg, override_model=model, override_dataset=dataset).run()


def measure(args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    """Train with ``nproc`` processes; tokens/s over the timed steps from rank 0's log."""
    with tempfile.TemporaryDirectory() as folder:
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, args.threads_total // nproc))}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command += ["--local-ranks-filter", "0", __file__, *sys.argv[1:], "--worker", folder]
        subprocess.run(command, env=env, check=True)
        log = Path(folder) / "training_log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()]
    seconds = [row["seconds"] for row in rows[args.warmup :]]
    tokens = args.batch * args.seq
    return {
        "nproc": nproc,
        "device": args.device,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "threads_per_process": max(1, args.threads_total // nproc),
        "median_step_s": statistics.median(seconds),
        "tokens_per_s": tokens * len(seconds) / sum(seconds),
    }


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    results = [measure(args, n) for n in args.nprocs]
    base = next((r["tokens_per_s"] for r in results if r["nproc"] == 1), None)
    for result in results:
        if base is not None:
            result["scaling_efficiency"] = result["tokens_per_s"] / (result["nproc"] * base)
        line = json.dumps(result)
        print(line)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
