"""Time a KL-trained TopK SAE's training step: EleutherAI's sparsify 1.3.3 vs this package.

Both sides train the same SAE shape at the same place of the same model on the same tokens:
the built-in SmolLM2-135M as a Hugging Face ``LlamaForCausalLM`` (weights from the package's
bundled GGUF, float32 or bf16), a TopK SAE (k = 32, 8 × 576 = 4,608 latents) on the output of
decoder layer 15 (sparsify's hookpoint ``layers.15``, this package's hook ``model.layers.15``),
batches of Shakespeare from the built-in corpus (the same batches, in the same order, on both
sides: every result carries a checksum of the token batches the model's embedding received).
sparsify has no ReLU + L1 SAE (its activations are ``topk`` and ``groupmax``), so only TopK is
compared.

What one step is on each side:

- ``--side sparsify``: an iteration of ``sparsify.Trainer.fit`` with ``loss_fn="kl"``, run by
  sparsify itself: a full clean forward and the softmax of its logits, a full forward with the
  SAE's output spliced in by a forward hook on ``layers.15``, the loss
  ``-(p_clean * log_softmax(dirty)).sum(-1).mean()`` (the cross-entropy against the clean
  distribution: KL plus a constant, so the same gradient), backward, sparsify's decoder
  bookkeeping and its optimizer (``--sparsify-optimizer``, default ``adam`` like ours; sparsify's
  own default is ``signum``). The softmax and the loss are taken in the model's dtype.
- ``--side plugin``: ``E2ETrainer.step`` as the runner's training loop calls it, built by
  ``E2ESAETrainingRunner`` from ``E2ERunnerConfig(loss="e2e",
  model_class_name="AutoModelForCausalLM", hook_name="model.layers.15",
  sae=TopKTrainingSAEConfig(d_in=576, d_sae=4608, k=32))``: the run up to the hook once, the
  clean and the patched continuations, the KL in float32 in chunks, backward, Adam. The
  package's speed settings are options: ``--autocast``, ``--compile-kl``, ``--kl-chunk-size``,
  and ``--tf32`` (TF32 float32 matrix products on a GPU, which sparsify's ``fit`` always turns
  on; on a CPU it changes nothing).

sparsify's step is timed inside its own ``fit`` loop: a stand-in for its ``wandb`` module
receives the per-step log (the loss) right after each optimizer step, and the clock reads there.
Each side runs in its own process, so its peak resident memory (and peak GPU memory with
``--device cuda``) is its own; the model is loaded directly in ``--lm-dtype`` on both sides.

sparsify is never a dependency of this package: it is installed into a folder of its own
(default ``.venv/sparsify-1.3.3``, git-ignored; ``--sparsify-path`` or ``$SPARSIFY_PATH``) and
imported from there. Its other dependencies (accelerate, datasets, transformers, einops,
safetensors, simple-parsing, huggingface-hub) are the ones SAELens' stack already has::

    python -m pip install --no-deps --target .venv/sparsify-1.3.3 \\
        eai-sparsify==1.3.3 natsort schedulefree
    # or let the benchmark run that command:
    python benchmarks/bench_vs_sparsify.py --install-sparsify

Examples::

    # one side, one process: prints one JSON object
    python benchmarks/bench_vs_sparsify.py --side sparsify --batch 8 --seq 128 --steps 3
    python benchmarks/bench_vs_sparsify.py --side plugin --batch 8 --seq 128 --steps 3
    # both sides alternately, 2 times each, as subprocesses; JSON lines appended to --out
    python benchmarks/bench_vs_sparsify.py --alternate 2 --batch 8 --seq 128 --lm-dtype bfloat16 \\
        --out benchmarks/results/vs_sparsify_8x128.jsonl
    # the issue's four settings, one after the other
    python benchmarks/bench_vs_sparsify.py --alternate 2 --sizes 8x128 8x1024 \\
        --lm-dtypes float32 bfloat16 --out benchmarks/results/vs_sparsify.jsonl
    # smoke test: 1 × 32 tokens, one step
    python benchmarks/bench_vs_sparsify.py --side plugin --quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    OtherLoad,
    PhaseTimer,
    bare_trainer,
    finish_result,
    limit_address_space,
    machine,
    one_step,
    package_version,
    step_only_fields,
    synchronize,
    wait_until_quiet,
)

ROOT = Path(__file__).resolve().parents[1]
SPARSIFY_VERSION = "1.3.3"
SPARSIFY_PATH_ENV = "SPARSIFY_PATH"
DEFAULT_SPARSIFY_PATH = ROOT / ".venv" / f"sparsify-{SPARSIFY_VERSION}"
SPARSIFY_PACKAGES = [f"eai-sparsify=={SPARSIFY_VERSION}", "natsort", "schedulefree"]

MODEL = "smollm2-135m"
LAYER = 15
"""The SAE reads the output of decoder layer 15 (of 30)."""
D_MODEL = 576
DICT_RATIO = 8
K = 32
LR = 5e-4
"""Both sides' Adam learning rate (sparsify's default would be 2e-4 / sqrt(4608 / 2**14))."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- shared


def tokens_for(args: argparse.Namespace, tokenizer: Any) -> torch.Tensor:
    """``warmup + steps`` batches [n, batch, seq] of Shakespeare from the built-in corpus:
    the same rows in the same order for a given ``--seed``, on either side."""
    from sae_e2e_plugin import load_builtin_dataset

    n = args.warmup + args.steps
    rows = load_builtin_dataset("shakespeare", tokenizer, args.seq, split="train")
    if n * args.batch > len(rows):
        raise SystemExit(f"the corpus has {len(rows)} rows of {args.seq} tokens; asked for more")
    picked = rows.shuffle(seed=args.seed).select(range(n * args.batch))["tokens"]
    return torch.tensor(picked, dtype=torch.long).view(n, args.batch, args.seq)


def checksum(batches: list[torch.Tensor]) -> str:
    """A short hash of token batches (their values and order)."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch.detach().to("cpu", torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


class TokenLog:
    """The token batches the model's embedding layer received, each once (a side may embed a
    batch twice: sparsify's clean and patched runs), so both sides' inputs can be compared."""

    def __init__(self, embedding: torch.nn.Module) -> None:
        self.batches: list[torch.Tensor] = []
        self.handle = embedding.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        ids = inputs[0]
        last = self.batches[-1] if self.batches else None
        if last is None or last.shape != ids.shape or not torch.equal(last, ids.cpu()):
            self.batches.append(ids.detach().cpu().clone())


class StepClock:
    """Step ends, marked by each side's loop; the first ``warmup`` steps are not timed, and
    other processes' CPU use is measured over the timed ones."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.marks: list[float] = []
        self.losses: list[float] = []
        self.load = OtherLoad()

    def start(self) -> None:
        self.marks = [time.perf_counter()]
        if self.warmup == 0:
            self.load.__enter__()

    def mark(self, loss: float) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())
        self.losses.append(loss)
        done = len(self.marks) - 1
        if done == self.warmup and self.steps > 0:
            self.load.__enter__()
        if done == self.warmup + self.steps:
            self.load.__exit__(None, None, None)

    def step_seconds(self) -> list[float]:
        """Seconds of each timed step (a step runs from one mark to the next)."""
        ends = self.marks[self.warmup :]
        return [round(b - a, 4) for a, b in zip(ends[:-1], ends[1:], strict=True)]


# --------------------------------------------------------------------------- sparsify


def install_sparsify(path: Path) -> None:
    """pip-install sparsify and its two dependencies SAELens' stack lacks into ``path``."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(path)]
    subprocess.run([*command, *SPARSIFY_PACKAGES], check=True)


def import_sparsify(path: Path) -> types.ModuleType:
    """``sparsify`` from its own folder, put first on sys.path so that this version is the one
    measured (the folder holds only sparsify, natsort and schedulefree)."""
    if not (path / "sparsify" / "__init__.py").exists():
        raise SystemExit(
            f"no sparsify under {str(path)!r}. Install it with `python -m pip install --no-deps "
            f"--target {path} {' '.join(SPARSIFY_PACKAGES)}` or `--install-sparsify`."
        )
    sys.path.insert(0, str(path))
    import sparsify

    return sparsify


def fake_wandb(clock: StepClock) -> types.ModuleType:
    """A stand-in for ``wandb`` that sparsify's ``fit`` logs to once per step, right after its
    optimizer step: the step's end, and its loss (nothing is sent anywhere)."""
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: None  # type: ignore[attr-defined]
    module.log = lambda info, step=None: clock.mark(float(info["kl_loss"]))  # type: ignore[attr-defined]
    return module


def run_sparsify(args: argparse.Namespace, clock: StepClock) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_e2e_plugin.assets.model import builtin_hf_model_folder

    sparsify = import_sparsify(args.sparsify_path)
    from sparsify import SparseCoderConfig, TrainConfig, Trainer

    folder = builtin_hf_model_folder(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = tokens_for(args, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=DTYPES[args.lm_dtype], local_files_only=True
    )
    model = model.to(torch.device(args.device)).eval()  # type: ignore[arg-type]
    # sparsify's DataLoader batches rows in order (no shuffling): our batches, in our order.
    dataset = Dataset.from_dict({"input_ids": tokens.flatten(0, 1).tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            SparseCoderConfig(num_latents=DICT_RATIO * D_MODEL, k=K),
            batch_size=args.batch,
            loss_fn="kl",
            optimizer=args.sparsify_optimizer,
            lr=LR,
            hookpoints=[f"layers.{LAYER}"],
            log_to_wandb=True,  # to our stand-in: how the step's end and loss reach the clock
            wandb_log_frequency=1,
            save_every=10**9,
            save_dir=save_dir,  # fit() saves once after its last step (not timed)
        )
        trainer = Trainer(cfg, dataset, model)  # type: ignore[arg-type]
        # From here on: Trainer() itself runs a dummy batch through the model to read widths.
        log = TokenLog(model.get_input_embeddings())
        real_wandb = sys.modules.get("wandb")
        sys.modules["wandb"] = fake_wandb(clock)
        try:
            clock.start()
            trainer.fit()
        finally:
            if real_wandb is not None:
                sys.modules["wandb"] = real_wandb
            else:
                del sys.modules["wandb"]
    log.handle.remove()
    return {
        "tokens_sha256": checksum(list(tokens)),
        "embedded_tokens_sha256": checksum(log.batches),
        "loss_name": "ce_vs_clean (KL + clean entropy)",
        "sparsify_optimizer": args.sparsify_optimizer,
        # with bitsandbytes installed, sparsify's "adam" is bitsandbytes' 8-bit Adam
        "sparsify_optimizer_classes": [type(o).__qualname__ for o in trainer.optimizers],
        "sparsify_from": str(Path(sparsify.__file__ or "").parent),
    }


# --------------------------------------------------------------------------- plugin


def run_plugin(args: argparse.Namespace, clock: StepClock) -> dict[str, Any]:
    from sae_lens import TopKTrainingSAEConfig

    from sae_e2e_plugin import E2ERunnerConfig
    from sae_e2e_plugin.assets.model import load_builtin_hf_model

    hook = f"model.layers.{LAYER}"
    dtype = DTYPES[args.lm_dtype]
    if args.tf32:
        torch.set_float32_matmul_precision("high")  # what sparsify's fit() sets for itself
    # hook_names=[hook]: what SAELens' runner asks load_model for (one hook point, not all).
    model = load_builtin_hf_model(MODEL, args.device, dtype, hook_names=[hook])
    tokens = tokens_for(args, model.tokenizer).to(args.device)
    extra: dict[str, Any] = {}
    if args.kl_chunk_size is not None:
        extra["kl_chunk_size"] = args.kl_chunk_size
    cfg = E2ERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=DICT_RATIO * D_MODEL, k=K),
        model_name=MODEL,
        model_class_name="AutoModelForCausalLM",
        hook_name=hook,
        lr=LR,
        device=args.device,
        loss="e2e",
        lm_dtype=args.lm_dtype,  # the model is already loaded in it: no cast, no second copy
        autocast=args.autocast,
        compile_kl=args.compile_kl,
        clean_run_dtype=args.clean_run_dtype,
        checkpoint_blocks=args.checkpoint_blocks,
        sparse_topk=not args.dense_topk,
        **step_only_fields(args.batch, args.seq, args.warmup + args.steps, args.seed),
        **extra,
    )
    timer = PhaseTimer(args.device)
    trainer = bare_trainer(cfg, model, args.batch, timer)
    for sae in trainer.saes.values():
        sae.to(cfg.device)
    log = TokenLog(model.model.get_input_embeddings())
    profiler = torch.profiler.profile(record_shapes=True) if args.torch_profile else None
    clock.start()
    for index, batch in enumerate(tokens):
        timer.enabled = args.phases and index >= args.warmup  # the timed steps only
        if profiler is not None and index == len(tokens) - 1:
            profiler.__enter__()
        (output,) = one_step(trainer, batch).values()
        clock.mark(float(output.losses["kl_loss"].detach()))
    log.handle.remove()
    if profiler is not None:
        profiler.__exit__(None, None, None)
        averages = profiler.key_averages(group_by_input_shape=True)
        table = averages.table(sort_by="self_cpu_time_total", row_limit=args.torch_profile)
        print(table, file=sys.stderr)
    phases = {name: round(s / args.steps, 4) for name, s in timer.seconds.items()}
    return {
        "tokens_sha256": checksum(list(tokens)),
        "embedded_tokens_sha256": checksum(log.batches),
        "loss_name": "kl_loss",
        "kl_chunk_size": cfg.kl_chunk_size,
        "fused_adam": cfg.fused_adam,  # the config's default (sparsify steps its own optimizer)
        **({"phase_s_per_step": phases, "phase_rss_gib": timer.memory} if args.phases else {}),
    }


# --------------------------------------------------------------------------- one side


def measure_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side's JSON result (also printed)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    limit_address_space(args.mem_limit_gib)
    clock = StepClock(args.warmup, args.steps, args.device)
    result: dict[str, Any] = {
        "benchmark": "vs_sparsify",
        "side": args.side,
        "model": MODEL,
        "hook": f"layers.{LAYER}" if args.side == "sparsify" else f"model.layers.{LAYER}",
        "sae": {"architecture": "topk", "d_in": D_MODEL, "d_sae": DICT_RATIO * D_MODEL, "k": K},
        "batch": args.batch,
        "seq": args.seq,
        "lm_dtype": args.lm_dtype,
        "device": args.device,
        "autocast": args.autocast if args.side == "plugin" else None,
        "compile_kl": args.compile_kl if args.side == "plugin" else None,
        "clean_run_dtype": args.clean_run_dtype if args.side == "plugin" else None,
        "checkpoint_blocks": args.checkpoint_blocks if args.side == "plugin" else None,
        "sparse_topk": (not args.dense_topk) if args.side == "plugin" else None,
        # sparsify's fit() sets torch.set_float32_matmul_precision("high"): TF32 on GPUs.
        "tf32": args.tf32 if args.side == "plugin" else True,
        "warmup": args.warmup,
        "steps": args.steps,
        "machine": machine(args.device),
        **package_version(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }
    if args.side == "sparsify":
        result["sparsify_version"] = SPARSIFY_VERSION
    t0 = time.perf_counter()
    try:
        run = run_sparsify if args.side == "sparsify" else run_plugin
        result.update(run(args, clock))
        seconds = clock.step_seconds()
        total = sum(seconds)
        result.update(
            status="ok",
            step_s=seconds,
            tokens_per_s=round(args.batch * args.seq * len(seconds) / total, 2) if total else None,
            losses=[round(x, 6) for x in clock.losses],
            other_cpu_fraction=clock.load.fraction,
        )
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        result.update(status="out_of_memory", error=str(exc).splitlines()[0][:300])
    return finish_result(result, args.device, t0)


# --------------------------------------------------------------------------- driver


def side_command(args: argparse.Namespace, side: str) -> list[str]:
    """The command line that measures ``side`` with this run's settings."""
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--lm-dtype", args.lm_dtype]
    command += ["--device", args.device, "--seed", str(args.seed)]
    command += ["--sparsify-path", str(args.sparsify_path)]
    command += ["--sparsify-optimizer", args.sparsify_optimizer]
    for flag in ("autocast", "compile_kl", "checkpoint_blocks", "dense_topk", "tf32", "phases"):
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    for option in ("kl_chunk_size", "clean_run_dtype", "threads", "mem_limit_gib"):
        if getattr(args, option) is not None:
            command += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    return command


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """One side in a fresh process: its JSON, or a record of why there is none."""
    proc = subprocess.run(side_command(args, side), capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"side": side, "status": "failed", "returncode": proc.returncode,
            "stderr_tail": proc.stderr[-2000:]}  # fmt: skip


def settings_matrix(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One copy of ``args`` per ``--sizes`` × ``--lm-dtypes`` combination (default: this one)."""
    sizes = args.sizes or [f"{args.batch}x{args.seq}"]
    dtypes = args.lm_dtypes or [args.lm_dtype]
    combos = []
    for size in sizes:
        batch, seq = (int(n) for n in size.split("x"))
        for dtype in dtypes:
            combos.append(
                argparse.Namespace(**vars(args) | dict(batch=batch, seq=seq, lm_dtype=dtype))
            )
    return combos


def alternate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """For each setting, both sides ``--alternate`` times, the order flipped each round (ABBA),
    so a slow drift of the machine hits both; each result is appended to ``--out`` as it
    arrives, and a summary per setting is printed (the last line: the last setting's)."""
    results = []
    for settings in settings_matrix(args):
        these = []
        for round_ in range(args.alternate):
            order = ("sparsify", "plugin") if round_ % 2 == 0 else ("plugin", "sparsify")
            for side in order:
                quiet = wait_until_quiet(args.max_other) if args.wait_quiet else None
                result = run_side(settings, side) | {"round": round_, "others_before": quiet}
                these.append(result)
                if args.out is not None:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    with args.out.open("a") as f:
                        f.write(json.dumps(result) + "\n")
        summary = summarise(these)
        summary.update(batch=settings.batch, seq=settings.seq, lm_dtype=settings.lm_dtype)
        print(json.dumps(summary), flush=True)
        results += these
    return results


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side: median tokens/s and s/step, peak memory; the speed-up over sparsify."""
    summary: dict[str, Any] = {"benchmark": "vs_sparsify_summary"}
    for side in ("sparsify", "plugin"):
        ok = [r for r in results if r["side"] == side and r.get("status") == "ok"]
        if not ok:
            summary[side] = None
            continue
        summary[side] = {
            "runs": len(ok),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in ok),
            "step_s_median": statistics.median(s for r in ok for s in r["step_s"]),
            "peak_rss_gib_max": max(r["peak_rss_gib"] for r in ok),
            "peak_gpu_mem_gib_max": max((r["peak_gpu_mem_gib"] or 0) for r in ok) or None,
            "other_cpu_fraction_max": max((r["other_cpu_fraction"] or 0) for r in ok),
            "embedded_tokens_sha256": sorted({r["embedded_tokens_sha256"] for r in ok}),
        }
    if summary["sparsify"] and summary["plugin"]:
        ratio = (
            summary["plugin"]["tokens_per_s_median"] / summary["sparsify"]["tokens_per_s_median"]
        )
        summary["plugin_speed_vs_sparsify"] = round(ratio, 3)
    return summary


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--side", choices=("sparsify", "plugin"), help="measure one side here")
    mode.add_argument("--alternate", type=int, metavar="N", help="both sides, N times each")
    mode.add_argument("--install-sparsify", action="store_true", help="pip-install it and exit")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--lm-dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="which corpus rows (shuffle seed)")
    p.add_argument("--autocast", action="store_true", help="plugin: SAELens' bf16 autocast")
    p.add_argument("--compile-kl", action="store_true", help="plugin: E2ERunnerConfig.compile_kl")
    p.add_argument(
        "--checkpoint-blocks", action="store_true", help="plugin: E2ERunnerConfig.checkpoint_blocks"
    )
    p.add_argument(
        "--dense-topk",
        action="store_true",
        help="plugin: sparse_topk=False (SAELens' dense TopK training forward pass)",
    )
    p.add_argument("--kl-chunk-size", type=int, default=None, help="plugin (default: config's)")
    p.add_argument(
        "--clean-run-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="plugin: E2ERunnerConfig.clean_run_dtype (the clean run's targets under autocast)",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="plugin: float32 matrix products in TF32 on GPUs, as sparsify's fit() always sets",
    )
    p.add_argument(
        "--sparsify-optimizer",
        choices=("adam", "signum", "muon"),
        default="adam",
        help="sparsify's optimizer (default adam, as ours; sparsify's own default: signum)",
    )
    p.add_argument(
        "--sparsify-path",
        type=Path,
        default=Path(os.environ.get(SPARSIFY_PATH_ENV, DEFAULT_SPARSIFY_PATH)),
        help=f"where sparsify is installed with --target (or ${SPARSIFY_PATH_ENV})",
    )
    p.add_argument("--phases", action="store_true", help="plugin: seconds per phase of a step")
    p.add_argument(
        "--torch-profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="plugin, --side only: torch.profiler's table of the last step's operators (by "
        "input shape) on stderr; that step's time includes the profiler's",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--mem-limit-gib", type=float, default=None, help="cap the address space")
    p.add_argument(
        "--sizes",
        nargs="+",
        metavar="BxS",
        help="--alternate: several batch x seq settings, e.g. 8x128 8x1024 (instead of --batch/--seq)",
    )
    p.add_argument(
        "--lm-dtypes",
        nargs="+",
        choices=tuple(DTYPES),
        help="--alternate: several model dtypes (instead of --lm-dtype)",
    )
    p.add_argument("--out", type=Path, help="--alternate: append each result here")
    p.add_argument("--wait-quiet", action="store_true", help="--alternate: wait before each run")
    p.add_argument("--max-other", type=float, default=0.1, help="'quiet': others' CPU share")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 × 32 tokens, one step")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup = 1, 32, 1, 0
        args.sizes = None  # one tiny setting
    return args


def main(argv: list[str] | None = None) -> Any:
    args = parse_args(argv)
    if args.install_sparsify:
        return install_sparsify(args.sparsify_path)
    if args.alternate:
        return alternate(args)
    return measure_side(args)


if __name__ == "__main__":
    main()
