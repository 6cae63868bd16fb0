"""The KL kernel alone: KL(p_orig ‖ p_patched) and its logit gradient over [rows, vocab] logits,
eager or compiled (``compile_kl=True``), the way a step's KL phase calls it once per chunk.

Prints one JSON line per round (the median of ``--repeats`` calls, in milliseconds) and a
summary line. Compare code versions by running it from two checkouts, alternated:

    python benchmarks/bench_kl_kernel.py --compile            # 512 rows × 50,257, bf16
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_kl_kernel.py --compile
    python benchmarks/bench_kl_kernel.py --quick              # smoke test (eager, tiny)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import machine, package_version

from sae_e2e_plugin.core import losses


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", type=int, default=512, help="tokens in the chunk (4 × 128)")
    p.add_argument("--vocab", type=int, default=50257, help="GPT-2's vocabulary")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--compile", action="store_true", help="the compile_kl=True kernel")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny logits, one round (smoke test)")
    args = p.parse_args()
    if args.quick:
        args.rows, args.vocab, args.rounds, args.repeats = 8, 50, 1, 1
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    orig, patched = (torch.randn(args.rows, args.vocab, generator=gen).to(dtype) for _ in "op")
    kernel = losses._compiled_kernel() if args.compile else losses._kl_kernel
    for _ in range(2):  # the compiled kernel compiles on its first call
        kl_sum, _ = kernel(orig, patched, True)
    settings = {k: getattr(args, k) for k in ("rows", "vocab", "dtype", "compile")}
    medians = []
    for index in range(args.rounds):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            kernel(orig, patched, True)
            times.append(time.perf_counter() - start)
        medians.append(1000 * statistics.median(times))
        print(json.dumps({"benchmark": "kl_kernel", **settings, "round": index, "ms": medians[-1]}))
    summary = {
        "benchmark": "kl_kernel_summary",
        **settings,
        "ms_median": round(statistics.median(medians), 2),
        "kl_sum": float(kl_sum),
        "kernel_from": losses.__file__,
        "threads": torch.get_num_threads(),
        "machine": machine("cpu"),
        **package_version(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
