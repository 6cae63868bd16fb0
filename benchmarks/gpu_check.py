"""The device check: the paper's GPT-2 layer-6 e2e training step on one device, four ways.

One command, one output folder, within 8 minutes on one H100::

    python benchmarks/gpu_check.py --device cuda --out gpu_check
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # smoke test

Each variant runs ``bench_step.py`` in its own process (so each peak memory is its own) on the
GPT-2-small-shaped model with random weights, an SAE at ``blocks.6.hook_resid_pre`` with
60 × 768 features and the paper's batch of 8 × 1024 tokens, one warm-up step and three timed:

- ``reference``: ``e2e-sae`` 2.1.1 as published (float32, the whole batch's logits); needs
  ``E2E_SAE_REF_PATH`` (benchmarks/README.md), otherwise it is recorded as skipped;
- ``float32``: this package's defaults with the model in float32 (``kl_chunk_size=512``;
  the default ``lm_dtype="auto"`` holds the model in bf16 on a GPU);
- ``fastest``: ``lm_dtype="bfloat16"``, ``compile_kl``, ``kl_chunk_size=8192``;
- ``lean``: ``lm_dtype="bfloat16"``, ``checkpoint_blocks``, ``kl_chunk_size=1024``.

Writes ``<out>/results.jsonl`` (``bench_step.py``'s JSON per variant, with the variant's name)
and ``<out>/summary.md`` (tokens/s, peak memory, the projected wall time of the paper's
410M-token run, memory against the reference's). An existing ``<out>/results.jsonl`` is
never overwritten (pass ``--overwrite``). ``--quick``: the tiny model, 2 × 32 tokens,
4 × d_model features, one timed step, and on a CPU no ``compile_kl`` (it compiles for tens of
seconds). Nothing is installed at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sae_e2e_plugin.run_files import atomic_write_text

BENCH_STEP = Path(__file__).resolve().parent / "bench_step.py"
PAPER_TOKENS = 410_000_000
"""Tokens of the paper's GPT-2 layer-6 e2e run (11 h 20 min on an A100, reference code)."""

VARIANTS: dict[str, list[str]] = {
    "reference": ["--impl", "reference"],
    "float32": ["--impl", "plugin", "--lm-dtype", "float32"],
    "fastest": [
        "--impl",
        "plugin",
        "--lm-dtype",
        "bfloat16",
        "--compile-kl",
        "--kl-chunk-size",
        "8192",
    ],
    "lean": [
        "--impl",
        "plugin",
        "--lm-dtype",
        "bfloat16",
        "--checkpoint-blocks",
        "--kl-chunk-size",
        "1024",
    ],
}
FULL = ["--layer", "6", "--dict-ratio", "60", "--batch", "8", "--seq", "1024"]
FULL += ["--steps", "3", "--warmup", "1"]
QUICK = ["--shape", "tiny", "--layer", "1", "--dict-ratio", "4", "--batch", "2", "--seq", "32"]
QUICK += ["--steps", "1", "--warmup", "1"]


def variant_args(name: str, device: str, quick: bool) -> list[str]:
    """``bench_step.py``'s arguments for one variant."""
    args = [*VARIANTS[name], *(QUICK if quick else FULL), "--device", device]
    if quick and device == "cpu" and "--compile-kl" in args:
        args.remove("--compile-kl")
    return args


def run_variant(name: str, device: str, quick: bool, timeout_s: float) -> dict[str, Any]:
    """One variant's JSON result, or a record of why it has none."""
    if name == "reference" and not _reference_installed():
        return {"variant": name, "status": "skipped", "error": "E2E_SAE_REF_PATH not set"}
    command = [sys.executable, str(BENCH_STEP), *variant_args(name, device, quick)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"variant": name, "status": "timeout", "error": f"over {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"variant": name, "status": "failed", "error": proc.stderr[-1500:]}
    return {"variant": name, **json.loads(lines[-1])}


def _reference_installed() -> bool:
    ref = os.environ.get("E2E_SAE_REF_PATH", "")
    return bool(ref) and (Path(ref) / "e2e_sae" / "__init__.py").exists()


def projected_hours(result: dict[str, Any]) -> float | None:
    """Hours the paper's 410M-token run would take at this variant's tokens/s."""
    speed = result.get("tokens_per_s")
    return round(PAPER_TOKENS / speed / 3600, 2) if speed else None


def peak_memory_gib(result: dict[str, Any]) -> float | None:
    """Peak GPU memory on a GPU, peak resident memory on the CPU."""
    return result.get("peak_gpu_mem_gib") or result.get("peak_rss_gib")


def summary(results: list[dict[str, Any]], device: str, quick: bool) -> str:
    """The Markdown table of ``summary.md``."""
    by_name = {r["variant"]: r for r in results}
    reference_memory = peak_memory_gib(by_name.get("reference", {}))
    machine = next((r["machine"] for r in results if "machine" in r), {})
    where = machine.get("gpu") or machine.get("cpu") or device
    memory_kind = "peak GPU memory" if device.startswith("cuda") else "peak RSS"
    lines = [
        f"# Device check on {where} ({device}{', quick' if quick else ''})",
        "",
        f"| variant | status | tokens/s | {memory_kind} (GiB) | vs reference memory | "
        "projected 410M-token run (h) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        memory = peak_memory_gib(r) if r.get("status") == "ok" else None
        ratio = f"{memory / reference_memory:.2f}" if memory and reference_memory else "–"
        lines.append(
            f"| {r['variant']} | {r.get('status')} | {r.get('tokens_per_s') or '–'} | "
            f"{memory or '–'} | {ratio} | {projected_hours(r) or '–'} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu, ...")
    p.add_argument("--out", type=Path, required=True, help="the folder for the results")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--timeout-s", type=float, default=150.0, help="per variant")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results_path = args.out / "results.jsonl"
    if results_path.exists() and not args.overwrite:
        raise SystemExit(
            f"--out {args.out} already holds results.jsonl from an earlier check; choose "
            "another --out or pass --overwrite to replace it."
        )
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants:
        result = run_variant(name, args.device, args.quick, args.timeout_s)
        result["projected_paper_run_h"] = projected_hours(result)
        results.append(result)
        print(f"{name}: {result.get('status')} {result.get('tokens_per_s')} tokens/s", flush=True)
    atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in results))
    table = summary(results, args.device, args.quick)
    atomic_write_text(args.out / "summary.md", table)
    print(table)
    return results


if __name__ == "__main__":
    main()
