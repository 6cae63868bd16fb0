"""Training-step throughput on the built-in SmolLM2-135M loaded both ways: as a TransformerLens
``HookedTransformer`` and as a Hugging Face ``AutoModelForCausalLM`` (SAELens' ``HookedProxyLM``).

The two paths train the same SAE (same initial weights) at the same place in the model:
``blocks.L.hook_resid_pre`` on the HookedTransformer is the output of decoder layer L-1,
``model.layers.{L-1}``, on the Hugging Face model. Each step is ``E2ETrainer.step`` as
the runner's training loop calls it (shared prefix, clean continuation, SAE, patched continuation,
chunked KL, backward, Adam), built by ``E2ESAETrainingRunner`` from one ``E2ERunnerConfig``
that differs only in ``model_class_name`` and ``hook_name``. Both models live in one process;
the paths alternate, ``--reps`` times, so a disturbance hits both. Token batches are
Shakespeare from the built-in corpus.

Prints one JSON object (``--out FILE`` appends it as a line): per path the median tokens/s
over the repetitions, every repetition's seconds per step, the first step's KL (the two
paths should agree), the CPU share other processes took meanwhile, and the machine. Example::

    python benchmarks/bench_hf.py --batch 4 --seq 128 --layer 15 --steps 3 --reps 3 \
        --out benchmarks/results/hf_vs_hooked_4x128.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OtherLoad,
    bare_trainer,
    machine,
    one_step,
    package_version,
    step_only_fields,
)

PATHS = ("hooked", "hf")


def load(path: str, layer: int) -> tuple[Any, str]:
    """(the model loaded the ``path`` way, the hook name of the residual entering ``layer``)."""
    from sae_e2e_plugin.assets.model import load_builtin_hf_model, load_builtin_model

    if path == "hooked":
        return load_builtin_model("smollm2-135m"), f"blocks.{layer}.hook_resid_pre"
    hook = f"model.layers.{layer - 1}"
    # hook_names=[hook]: what SAELens' runner asks load_model for (one hook point, not all).
    return load_builtin_hf_model("smollm2-135m", hook_names=[hook]), hook


def step_fn(args: argparse.Namespace, model: Any, hook: str, path: str) -> Callable[..., Any]:
    """One training step of a fresh runner's trainer on ``model``; same SAE seed for each path."""
    from sae_lens import StandardTrainingSAEConfig

    from sae_e2e_plugin import E2ERunnerConfig

    cfg = E2ERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=576, d_sae=args.dict_ratio * 576, l1_coefficient=1e-4, apply_b_dec_to_input=False
        ),
        model_name="smollm2-135m",
        model_class_name="HookedTransformer" if path == "hooked" else "AutoModelForCausalLM",
        hook_name=hook,
        lr=1e-3,
        device="cpu",
        loss=args.loss,
        kl_chunk_size=args.kl_chunk_size,
        **step_only_fields(args.batch, args.seq, steps=1000, seed=args.seed),
    )
    trainer = bare_trainer(cfg, model, args.batch)

    def step(tokens: torch.Tensor) -> dict[str, float]:
        (output,) = one_step(trainer, tokens).values()
        return {name: float(v.detach()) for name, v in output.losses.items()}

    return step


def tokens_for(args: argparse.Namespace, tokenizer: Any, n: int) -> torch.Tensor:
    """``n`` batches [n, batch, seq] of Shakespeare from the built-in corpus."""
    from sae_e2e_plugin import load_builtin_dataset

    rows = load_builtin_dataset("shakespeare", tokenizer, args.seq, split="train")
    picked = rows.shuffle(seed=args.seed).select(range(n * args.batch))["tokens"]
    return torch.tensor(picked).view(n, args.batch, args.seq)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layer", type=int, default=15, help="block L: the SAE reads its input")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--dict-ratio", type=int, default=8, help="d_sae / d_model")
    parser.add_argument("--kl-chunk-size", type=int, default=2048)
    parser.add_argument("--loss", default="e2e", choices=("e2e", "e2e_downstream", "local"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the JSON object as a line here")
    args = parser.parse_args(argv)

    models = {path: load(path, args.layer) for path in PATHS}
    n_batches = args.warmup + args.reps * args.steps
    tokens = tokens_for(args, models["hooked"][0].tokenizer, n_batches)
    steps = {path: step_fn(args, model, hook, path) for path, (model, hook) in models.items()}
    first = {path: steps[path](tokens[0]) for path in PATHS}  # same batch, same SAE weights
    for path in PATHS:
        for i in range(1, args.warmup):
            steps[path](tokens[i])
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    others: dict[str, list[float | None]] = {path: [] for path in PATHS}
    for rep in range(args.reps):
        batch = tokens[args.warmup + rep * args.steps : args.warmup + (rep + 1) * args.steps]
        for path in PATHS:
            with OtherLoad() as load_meter:
                start = time.perf_counter()
                for b in batch:
                    steps[path](b)
                elapsed = time.perf_counter() - start
            seconds[path].append(round(elapsed / args.steps, 4))
            others[path].append(load_meter.fraction)
    n_tokens = args.batch * args.seq
    result = {
        "benchmark": "hf_vs_hooked",
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "hooks": {path: hook for path, (_, hook) in models.items()},
        "first_step_losses": first,
        "seconds_per_step": seconds,
        "tokens_per_s_median": {
            path: round(n_tokens / statistics.median(s), 1) for path, s in seconds.items()
        },
        "other_cpu_fraction": others,
        "machine": machine(),
        "version": package_version(),
    }
    text = json.dumps(result)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
