"""Time one end-to-end SAE training step: the reference ``e2e_sae`` 2.1.1 vs this plugin.

One process measures one implementation (so its peak memory is its own), on a
GPT-2-small-shaped model with random weights (seed 0, identical in every process),
an SAE at ``blocks.<layer>.hook_resid_pre`` with 16 × d_model features, and identical
random token batches. A step is forward (clean and patched runs), the loss, backward
and the optimizer update. The first ``--warmup`` steps are not timed. Prints one JSON
object: tokens/s over the timed steps, each step's seconds, peak resident memory.

``--impl reference`` reproduces one step of the reference's training loop
(``e2e_sae/scripts/train_tlens_saes/run_train_tlens_saes.py::train``) with its own
objects: ``SAETransformer.forward_raw`` (the clean run, logits and cached SAE input),
``SAETransformer.forward`` (the patched run from the tokens, SAE in a hook),
``calc_loss`` with the paper's GPT-2 e2e loss config (``logits_kl`` coefficient 1.0,
Lp sparsity p=1 coefficient 1.5, ``out_to_in`` at coefficient 0.0), ``loss.backward()``,
grad-norm clipping at 10, Adam and its cosine LR schedule. The reference is imported
from where it was installed, never copied:

    pip install --no-deps --target /work/refenv e2e-sae==2.1.1
    python benchmarks/bench_step.py --impl reference --ref-path /work/refenv ...

(or set ``E2E_SAE_REF_PATH``). Its wheel does not ship the module
``e2e_sae.scripts.train_tlens.run_train_tlens`` that ``e2e_sae.loader`` imports (for a
config class used only to load a locally trained tlens model); a stub module is put in
``sys.modules`` before the import. Its other imports need ``pydantic``, ``einops``,
``wandb``, ``python-dotenv``, ``pyyaml`` and ``jaxtyping``, all already dependencies of
SAELens or this plugin.

``--impl plugin`` runs ``E2ETrainer.step`` (as the runner's training loop calls it) built by
``E2ESAETrainingRunner`` from an ``E2ERunnerConfig`` with a standard SAELens SAE,
``loss="e2e"``, the same coefficients (L1 1.5 / d_model, KL 1.0, clip 10) and the
options given here (``--lm-dtype``, ``--kl-chunk-size``, ``--autocast``).

Examples::

    python benchmarks/bench_step.py --impl reference --batch 4 --seq 128 --layer 6 --steps 5
    python benchmarks/bench_step.py --impl plugin --batch 4 --seq 128 --layer 6 --steps 5
    python benchmarks/bench_step.py --impl plugin --lm-dtype bfloat16 --batch 8 --seq 1024 \\
        --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DICT_RATIO,
    OtherLoad,
    PhaseTimer,
    bare_trainer,
    finish_result,
    gpt2_shaped_model,
    limit_address_space,
    machine,
    one_step,
    package_version,
    peak_rss_bytes,
    step_only_fields,
    synchronize,
    token_batches,
    weights_checksum,
)

REF_PATH_ENV = "E2E_SAE_REF_PATH"
MISSING_REF_MODULE = "e2e_sae.scripts.train_tlens.run_train_tlens"

# The paper's GPT-2 e2e settings (gpt2_e2e.yaml of the reference), used by both sides.
LR = 5e-4
SPARSITY_COEFF = 1.5
KL_COEFF = 1.0
MAX_GRAD_NORM = 10.0
N_SAMPLES = 400_000
WARMUP_SAMPLES = 20_000


# --------------------------------------------------------------------------- reference


def import_reference(ref_path: str) -> types.ModuleType:
    """Import ``e2e_sae`` from ``ref_path`` with a stub for the module its wheel lacks."""
    if not (Path(ref_path) / "e2e_sae" / "__init__.py").exists():
        raise SystemExit(
            f"no e2e_sae package under {ref_path!r}. Install it with "
            f"`pip install --no-deps --target {ref_path} e2e-sae==2.1.1`, or pass --ref-path."
        )
    sys.path.insert(0, ref_path)
    stub = types.ModuleType(MISSING_REF_MODULE)

    class HookedTransformerPreConfig:  # only used by e2e_sae to load a locally trained tlens model
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("stub: not shipped in the e2e-sae 2.1.1 wheel")

    stub.HookedTransformerPreConfig = HookedTransformerPreConfig  # type: ignore[attr-defined]
    sys.modules[MISSING_REF_MODULE.rsplit(".", 1)[0]] = types.ModuleType(
        MISSING_REF_MODULE.rsplit(".", 1)[0]
    )
    sys.modules[MISSING_REF_MODULE] = stub
    # e2e_sae.settings reads $GITHUB_WORKSPACE whenever $CI is set (it assumes GitHub Actions);
    # other CI systems set CI alone. Its REPO_ROOT only locates its own output folders.
    if os.environ.get("CI") and "GITHUB_WORKSPACE" not in os.environ:
        os.environ["GITHUB_WORKSPACE"] = str(Path(ref_path).resolve())
    import e2e_sae

    return e2e_sae


def reference_step_fn(
    args: argparse.Namespace, timer: PhaseTimer
) -> tuple[Callable[[torch.Tensor], float], torch.nn.Module]:
    import_reference(args.ref_path)
    from e2e_sae.losses import (
        LogitsKLLoss,
        LossConfigs,
        OutToInLoss,
        SparsityLoss,
        calc_loss,
    )
    from e2e_sae.models.transformers import SAETransformer
    from e2e_sae.utils import get_cosine_schedule_with_warmup

    plugin_only = args.autocast or args.checkpoint_blocks or args.compile_kl or args.kl_chunk_size
    plugin_only = plugin_only or args.unfused_adam
    if args.lm_dtype not in (None, "float32") or plugin_only:
        raise SystemExit("the reference runs as published: float32, no plugin options")
    tlens = gpt2_shaped_model(args.seed, args.shape)
    hook = f"blocks.{args.layer}.hook_resid_pre"
    torch.manual_seed(args.seed)
    model = SAETransformer(
        tlens, raw_sae_positions=[hook], dict_size_to_input_ratio=args.dict_ratio
    )
    model = model.to(device=torch.device(args.device))
    # As run_train_tlens_saes.train() sets up training:
    model.saes.train()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("saes.")
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, model.parameters()), lr=LR)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=WARMUP_SAMPLES // args.batch,
        num_training_steps=N_SAMPLES // args.batch,
        min_lr_factor=0.1,
    )
    loss_configs = LossConfigs(
        sparsity=SparsityLoss(coeff=SPARSITY_COEFF, p_norm=1.0),
        in_to_orig=None,
        out_to_orig=None,
        out_to_in=OutToInLoss(coeff=0.0),
        logits_kl=LogitsKLLoss(coeff=KL_COEFF),
    )

    def step(tokens: torch.Tensor) -> float:
        # One iteration of the reference's training loop (no gradient accumulation:
        # effective_batch_size == batch_size), minus logging/eval/saving.
        with timer.phase("clean forward (forward_raw)"):
            orig_logits, orig_acts = model.forward_raw(
                tokens=tokens, run_entire_model=True, final_layer=None, cache_positions=None
            )
        with timer.phase("patched forward (SAE in hook)"):
            new_logits, new_acts = model.forward(
                tokens=tokens,
                sae_positions=model.raw_sae_positions,
                cache_positions=None,
                orig_acts=None,
            )
        with timer.phase("calc_loss (KL, sparsity, out_to_in)"):
            loss, _ = calc_loss(
                orig_acts=orig_acts,
                new_acts=new_acts,
                orig_logits=orig_logits.detach().clone(),
                new_logits=new_logits,
                loss_configs=loss_configs,
                is_log_step=False,
            )
        with timer.phase("backward"):
            loss.backward()
        with timer.phase("clip + Adam + schedule"):
            torch.nn.utils.clip_grad_norm_(model.saes.parameters(), MAX_GRAD_NORM).item()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        return float(loss.item())

    return step, tlens


# --------------------------------------------------------------------------- plugin


def plugin_step_fn(
    args: argparse.Namespace, timer: PhaseTimer
) -> tuple[Callable[[torch.Tensor], float], torch.nn.Module]:
    from sae_lens import StandardTrainingSAEConfig

    from sae_e2e_plugin import E2ERunnerConfig

    model = gpt2_shaped_model(args.seed, args.shape)
    checksum = weights_checksum(model)
    model.to(args.device)
    d_model = model.cfg.d_model
    extra: dict[str, Any] = {}
    if args.kl_chunk_size is not None:
        extra["kl_chunk_size"] = args.kl_chunk_size
    if args.lm_dtype is not None:
        extra["lm_dtype"] = args.lm_dtype
    if args.checkpoint_blocks:
        extra["checkpoint_blocks"] = True
    if args.compile_kl:
        extra["compile_kl"] = True
    if args.unfused_adam:
        extra["fused_adam"] = False
    cfg = E2ERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_model,
            d_sae=args.dict_ratio * d_model,
            l1_coefficient=SPARSITY_COEFF / d_model,  # the reference divides its Lp norm by d_in
            apply_b_dec_to_input=False,
        ),
        model_name="gpt2-small-shaped-random",
        hook_name=f"blocks.{args.layer}.hook_resid_pre",
        lr=LR,
        device=args.device,
        loss="e2e",
        kl_coefficient=KL_COEFF,
        max_grad_norm=MAX_GRAD_NORM,
        autocast=args.autocast,
        **step_only_fields(args.batch, args.seq, args.steps + args.warmup, args.seed),
        **extra,
    )
    # The trainer names its phases (sae_e2e_plugin.training.timing); --phases times them.
    trainer = bare_trainer(cfg, model, args.batch, timer)
    for sae in trainer.saes.values():
        sae.to(cfg.device)

    def step(tokens: torch.Tensor) -> float:
        (output,) = one_step(trainer, tokens).values()
        return float(output.loss.detach())

    step.checksum = checksum  # type: ignore[attr-defined]
    return step, model


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=("reference", "plugin"), required=True)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--layer", type=int, default=6, help="SAE at blocks.<layer>.hook_resid_pre")
    p.add_argument(
        "--dict-ratio",
        type=int,
        default=DICT_RATIO,
        help=f"SAE features as a multiple of d_model (default {DICT_RATIO}; the paper: 60)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the model, the SAE and the batches live (cpu, cuda, cuda:1, ...)",
    )
    p.add_argument(
        "--lm-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="plugin: E2ERunnerConfig.lm_dtype (default: its default, 'auto': bf16 on a CUDA "
        "GPU, fp32 as built on a CPU)",
    )
    p.add_argument(
        "--kl-chunk-size",
        type=int,
        default=None,
        help="plugin: E2ERunnerConfig.kl_chunk_size (default: the config's default)",
    )
    p.add_argument(
        "--checkpoint-blocks",
        action="store_true",
        help="plugin: E2ERunnerConfig.checkpoint_blocks (recompute blocks in backward)",
    )
    p.add_argument(
        "--compile-kl",
        action="store_true",
        help="plugin: E2ERunnerConfig.compile_kl (torch.compile the KL's elementwise part)",
    )
    p.add_argument(
        "--unfused-adam",
        action="store_true",
        help="plugin: E2ERunnerConfig.fused_adam=False (SAELens' Adam loop, not torch's fused kernel)",
    )
    p.add_argument(
        "--autocast",
        action="store_true",
        help="plugin: SAELens' autocast flag (bf16 autocast around the SAE and loss)",
    )
    p.add_argument(
        "--shape",
        choices=("gpt2-small", "tiny"),
        default="gpt2-small",
        help="model shape (tiny: for smoke tests)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--seed", type=int, default=0, help="model weights seed")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument(
        "--ref-path",
        default=os.environ.get(REF_PATH_ENV, "/work/refenv"),
        help=f"where e2e-sae 2.1.1 was installed with --target (or ${REF_PATH_ENV})",
    )
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=None,
        help="cap the address space: running out of memory then raises a clean error",
    )
    p.add_argument("--phases", action="store_true", help="also report seconds per phase of a step")
    p.add_argument(
        "--torch-profile",
        type=int,
        default=0,
        metavar="N",
        help="print torch.profiler's N most expensive ops of the timed steps to stderr",
    )
    return p.parse_args(argv)


def _profiled_activities(device: str) -> list[torch.profiler.ProfilerActivity]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    limit_address_space(args.mem_limit_gib)
    timer = PhaseTimer(args.device)
    result: dict[str, Any] = {
        "impl": args.impl,
        "batch": args.batch,
        "seq": args.seq,
        "layer": args.layer,
        "dict_ratio": args.dict_ratio,
        "device": args.device,
        "shape": args.shape,
        # The plugin's default is lm_dtype="auto" (bf16 on a CUDA GPU, float32 on a CPU).
        "lm_dtype": args.lm_dtype or ("float32" if args.impl == "reference" else "auto"),
        "kl_chunk_size": args.kl_chunk_size,
        "autocast": args.autocast,
        "checkpoint_blocks": args.checkpoint_blocks,
        "compile_kl": args.compile_kl,
        # The plugin's Adam: torch's fused kernel (fused_adam, the default) or SAELens' loop.
        "fused_adam": None if args.impl == "reference" else not args.unfused_adam,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": machine(args.device),
        **package_version(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }
    t0 = time.perf_counter()
    try:
        build = reference_step_fn if args.impl == "reference" else plugin_step_fn
        step, model = build(args, timer)
        result["weights_checksum"] = getattr(step, "checksum", None) or weights_checksum(model)
        result["setup_s"] = round(time.perf_counter() - t0, 3)
        result["peak_rss_after_setup_gib"] = round(peak_rss_bytes() / 2**30, 3)
        batches = token_batches(args.warmup + args.steps, args.batch, args.seq, model.cfg.d_vocab)
        batches = batches.to(args.device)
        for i in range(args.warmup):
            step(batches[i])
        synchronize(args.device)
        timer.enabled = args.phases
        step_seconds, losses = [], []
        profiler = (
            torch.profiler.profile(activities=_profiled_activities(args.device))
            if args.torch_profile
            else None
        )
        if profiler is not None:
            profiler.__enter__()
        with OtherLoad() as other:
            for i in range(args.warmup, args.warmup + args.steps):
                start = time.perf_counter()
                losses.append(step(batches[i]))  # float(loss) waits for the step's work
                synchronize(args.device)
                step_seconds.append(time.perf_counter() - start)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            print(
                profiler.key_averages().table(
                    sort_by="self_cuda_time_total"
                    if args.device.startswith("cuda")
                    else "self_cpu_time_total",
                    row_limit=args.torch_profile,
                ),
                file=sys.stderr,
            )
        total = sum(step_seconds)
        result.update(
            status="ok",
            step_s=[round(s, 4) for s in step_seconds],
            tokens_per_s=round(args.batch * args.seq * args.steps / total, 2) if total else None,
            losses=[round(x, 6) for x in losses],
            other_cpu_fraction=other.fraction,
        )
        if args.phases:
            result["phase_s_per_step"] = {
                name: round(s / args.steps, 4) for name, s in timer.seconds.items()
            }
            result["phase_rss_gib_end_and_peak"] = timer.memory
    except (MemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        result.update(status="out_of_memory", error=str(exc).splitlines()[0][:300])
    return finish_result(result, args.device, t0)


if __name__ == "__main__":
    main()
