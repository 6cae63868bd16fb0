"""Run ``bench_step.py`` over implementations, layers and sizes, alternating, and summarise.

Each measurement is its own process. Within a repetition the variants run back to back
(their order rotates from one repetition to the next), so slow drifts of the machine hit
every variant alike. Before each run the driver waits for the other processes on the
machine to go quiet, and a run during which they took more than ``--max-other`` of the
CPUs is repeated (up to ``--attempts`` times; every attempt is kept in the output file).

Runs are appended to ``--out``; running the same command again skips the repetitions that
already have a clean run there (so an interrupted or disturbed matrix can be completed later),
and only clean runs enter the summary.

Summary: for each size, layer and variant the median, min and max tokens/s over the
repetitions, and each variant's speed-up over the reference, taken repetition by repetition
(median, min, max).

Example (the throughput table of docs/performance.md)::

    python benchmarks/run_matrix.py --sizes 4x128 --layers 2 6 10 --reps 3 \\
        --out benchmarks/results/throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import wait_until_quiet  # noqa: E402

HERE = Path(__file__).resolve().parent

VARIANTS: dict[str, str] = {
    "reference": "--impl reference",
    "plugin-fp32": "--impl plugin --lm-dtype float32",
    "plugin-bf16": "--impl plugin --lm-dtype bfloat16",
    "plugin-bf16-autocast": "--impl plugin --lm-dtype bfloat16 --autocast",
    "plugin-fastest": "--impl plugin --lm-dtype bfloat16 --autocast --compile-kl",
    "plugin-fp32-compiled": "--impl plugin --lm-dtype float32 --compile-kl",
    "plugin-fp32-ckpt": "--impl plugin --lm-dtype float32 --checkpoint-blocks",
    "plugin-fastest-ckpt": "--impl plugin --lm-dtype bfloat16 --autocast --compile-kl --checkpoint-blocks",
}
"""Name → bench_step.py arguments. ``--variant NAME=ARGS`` adds or replaces one."""


def run_once(
    args_str: str, size: tuple[int, int], layer: int, opts: argparse.Namespace
) -> dict[str, Any]:
    batch, seq = size
    cmd = [
        sys.executable,
        str(HERE / "bench_step.py"),
        *shlex.split(args_str),
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--layer",
        str(layer),
        "--steps",
        str(opts.steps),
        "--warmup",
        str(opts.warmup),
    ]
    if opts.mem_limit_gib:
        cmd += ["--mem-limit-gib", str(opts.mem_limit_gib)]
    cmd += shlex.split(opts.extra)
    start = time.perf_counter()
    where = {"batch": batch, "seq": seq, "layer": layer, "cmd": shlex.join(cmd)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": opts.timeout, **where}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            "status": f"exit {proc.returncode}",
            **where,
            "stderr_tail": proc.stderr[-1500:],
            "process_wall_s": round(time.perf_counter() - start, 2),
        }
    result = json.loads(lines[-1])
    result["cmd"] = shlex.join(cmd)
    result["process_wall_s"] = round(time.perf_counter() - start, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["4x128"], help="BATCHxSEQ")
    p.add_argument("--layers", nargs="+", type=int, default=[6])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="define a variant, e.g. 'plugin-fast=--impl plugin --lm-dtype bfloat16 --kl-chunk-size 512'",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--mem-limit-gib", type=float, default=None)
    p.add_argument(
        "--extra", default="", help="more bench_step.py arguments for every run, e.g. '--phases'"
    )
    p.add_argument(
        "--max-other",
        type=float,
        default=0.05,
        help="repeat a run if other processes used more than this share of the CPUs",
    )
    p.add_argument("--attempts", type=int, default=3)
    p.add_argument(
        "--summarise-only", action="store_true", help="print the tables of --out and exit"
    )
    p.add_argument("--quiet-wait-s", type=float, default=300)
    p.add_argument("--out", type=Path, default=HERE / "results" / "matrix.jsonl")
    opts = p.parse_args(argv)
    variants = dict(VARIANTS)
    for spec in opts.variant:
        name, _, args_str = spec.partition("=")
        variants[name] = args_str
    unknown = [v for v in opts.variants if v not in variants]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(variants)}")
    sizes = [tuple(int(x) for x in s.lower().split("x")) for s in opts.sizes]
    opts.out.parent.mkdir(parents=True, exist_ok=True)

    # Resume: repetitions already measured cleanly in --out are kept and not run again.
    done: list[dict[str, Any]] = []
    if opts.out.exists():
        done = [
            r
            for r in map(json.loads, opts.out.read_text().splitlines())
            if is_clean(r, opts.max_other)
        ]
    rows = [r for r in done if r["variant"] in opts.variants]
    if opts.summarise_only:
        print(summarise(rows))
        return
    have = {(r["rep"], r["batch"], r["seq"], r["layer"], r["variant"]) for r in rows}
    with opts.out.open("a") as out:
        for rep in range(opts.reps):
            for size in sizes:
                for layer in opts.layers:
                    k = rep % len(opts.variants)
                    order = opts.variants[k:] + opts.variants[:k]
                    for name in order:
                        if (rep, *size, layer, name) in have:
                            continue
                        for attempt in range(1, opts.attempts + 1):
                            quiet = wait_until_quiet(max_wait_s=opts.quiet_wait_s)
                            r = run_once(variants[name], size, layer, opts)
                            other = r.get("other_cpu_fraction")
                            r.update(
                                variant=name,
                                rep=rep,
                                attempt=attempt,
                                others_before=quiet,
                                accepted=other is None
                                or other <= opts.max_other
                                or attempt == opts.attempts,
                            )
                            out.write(json.dumps(r) + "\n")
                            out.flush()
                            print(
                                f"rep {rep} {size[0]}x{size[1]} L{layer} {name:14s} attempt {attempt}: "
                                f"{r.get('status')} {r.get('tokens_per_s')} tok/s, "
                                f"peak {r.get('peak_rss_gib')} GiB, others {other}",
                                flush=True,
                            )
                            if r["accepted"]:
                                if is_clean(r, opts.max_other):
                                    rows.append(r)
                                break
    print(summarise(rows))


def is_clean(r: dict[str, Any], max_other: float) -> bool:
    """A finished run during which other processes stayed under ``max_other`` of the CPUs.

    Runs that failed (timeout, out of memory) count as clean results too: they are outcomes."""
    if r.get("status") != "ok":
        return "variant" in r and "batch" in r
    other = r.get("other_cpu_fraction")
    return other is not None and other <= max_other


def summarise(rows: list[dict[str, Any]]) -> str:
    """Markdown tables: tokens/s per variant and speed-ups over the reference."""
    lines = [
        "| size | layer | variant | tokens/s median | min | max | peak RSS GiB (median) | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["batch"], r["seq"], r["layer"]) for r in rows if "batch" in r})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    for b, s, layer in keys:
        for name in names:
            sel = [
                r
                for r in rows
                if (r.get("batch"), r.get("seq"), r.get("layer"), r["variant"])
                == (b, s, layer, name)
            ]
            tps = [r["tokens_per_s"] for r in sel if r.get("tokens_per_s")]
            mem = [r["peak_rss_gib"] for r in sel if r.get("peak_rss_gib")]
            if not sel:
                continue
            if not tps:
                lines.append(
                    f"| {b}×{s} | {layer} | {name} | {sel[0].get('status')} | | | | {len(sel)} |"
                )
                continue
            lines.append(
                f"| {b}×{s} | {layer} | {name} | {statistics.median(tps):.1f} | {min(tps):.1f} | "
                f"{max(tps):.1f} | {statistics.median(mem):.2f} | {len(tps)} |"
            )
    lines += [
        "",
        "| size | layer | variant | speed-up vs reference: median | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for b, s, layer in keys:
        ref = {
            r["rep"]: r["tokens_per_s"]
            for r in rows
            if (r.get("batch"), r.get("seq"), r.get("layer"), r["variant"])
            == (b, s, layer, "reference")
            and r.get("tokens_per_s")
        }
        for name in names:
            if name == "reference":
                continue
            ratios = [
                r["tokens_per_s"] / ref[r["rep"]]
                for r in rows
                if (r.get("batch"), r.get("seq"), r.get("layer"), r["variant"])
                == (b, s, layer, name)
                and r.get("tokens_per_s")
                and r["rep"] in ref
            ]
            if ratios:
                lines.append(
                    f"| {b}×{s} | {layer} | {name} | {statistics.median(ratios):.2f}× | "
                    f"{min(ratios):.2f}× | {max(ratios):.2f}× |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
