"""What running the frozen model in bf16 (``lm_dtype="bfloat16"``) costs in accuracy; with
``--clean-run-dtype bfloat16``, what running only the clean run's targets in bf16
(``clean_run_dtype="bfloat16"``, the model in float32) costs instead.

The SAE stays float32 in both cases and the log-softmax/KL are taken in float32; only the
language model's weights and activations change precision. Steps:

1. Load the model in float32: the built-in SmolLM2-135M (``sae_e2e_plugin.assets``) on the
   built-in Shakespeare corpus when available, else the GPT-2-small-shaped random model of
   ``bench_step.py`` on random tokens (``--model`` chooses).
2. Train an SAE a little at a middle layer with this plugin's runner (``loss="local"``,
   float32), so its reconstruction is neither random nor perfect; or load a trained one
   (``--sae-path``, e.g. an e2e SAE from a sweep).
3. On the same held-out tokens, with that same SAE, compare the model in float32 and in bf16:
   KL(p_orig ‖ p_patched) per token, cross-entropy clean and patched, the bf16 model's own
   distance from the float32 one (the noise floor), and the gradient of the KL with respect
   to the SAE's parameters (what training follows): cosine similarity and relative norm.
4. ``--e2e-steps N``: continue training that SAE with ``loss="e2e"`` for N steps twice, from
   the same weights on the same batches, once with the float32 model and once with
   ``lm_dtype="bfloat16"``; evaluate both SAEs with the float32 model.

Prints the runs' progress, then one JSON object; ``--out FILE`` also writes the object alone to
a file. Example::

    python benchmarks/bench_precision.py --model smollm2-135m --e2e-steps 40
    python benchmarks/bench_precision.py --model smollm2-135m --e2e-steps 40 \
        --clean-run-dtype bfloat16 --out benchmarks/results/precision_clean_run_bf16.json
    python benchmarks/bench_precision.py --model smollm2-135m \
        --sae-path "sweeps/smollm2_layer15/runs/loss=e2e__l1_coefficient=0.006" --e2e-steps 20 \
        --out benchmarks/results/precision_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gpt2_shaped_model, machine, token_batches  # noqa: E402


def load_model_and_data(args: argparse.Namespace) -> tuple[Any, Any, torch.Tensor, str]:
    """(fp32 model, training Dataset, eval tokens [n, ctx], description)."""
    from datasets import Dataset

    want = args.model
    if want in ("auto", "smollm2-135m"):
        try:
            from sae_e2e_plugin import load_builtin_dataset, load_builtin_model

            model = load_builtin_model("smollm2-135m", dtype=torch.float32)
            train = load_builtin_dataset(
                "shakespeare", model.tokenizer, args.context, split="train"
            )
            evals = load_builtin_dataset("shakespeare", model.tokenizer, args.context, split="eval")
            gen = torch.Generator().manual_seed(args.seed)
            rows = torch.randperm(len(evals), generator=gen)[: args.eval_seqs].tolist()
            eval_tokens = torch.tensor(evals.select(rows)["tokens"])
            train = train.shuffle(seed=args.seed)
            return model, train, eval_tokens, "SmolLM2-135M-Instruct (built-in), Shakespeare"
        except (ImportError, FileNotFoundError, ModuleNotFoundError) as exc:
            if want == "smollm2-135m":
                raise
            print(
                f"built-in model unavailable ({exc}); using the GPT-2-shaped model", file=sys.stderr
            )
    model = gpt2_shaped_model(args.seed)
    vocab = model.cfg.d_vocab
    n_train = max(64, args.local_steps * args.batch)
    train_rows = token_batches(1, n_train, args.context, vocab, seed=args.seed + 1)[0]
    eval_tokens = token_batches(1, args.eval_seqs, args.context, vocab, seed=args.seed + 2)[0]
    train = Dataset.from_dict({"tokens": train_rows.tolist()})
    return model, train, eval_tokens, "GPT-2-small-shaped, random weights, random tokens"


def runner_cfg(args: argparse.Namespace, d_model: int, loss: str, steps: int, **extra: Any) -> Any:
    from sae_lens import LoggingConfig, StandardTrainingSAEConfig

    from sae_e2e_plugin import E2ERunnerConfig

    tokens = args.batch * args.context
    return E2ERunnerConfig(
        sae=StandardTrainingSAEConfig(
            d_in=d_model,
            d_sae=args.dict_ratio * d_model,
            l1_coefficient=args.l1 if loss == "local" else args.e2e_l1,
            apply_b_dec_to_input=False,
        ),
        model_name="bench-model",
        hook_name=f"blocks.{args.layer}.hook_resid_pre",
        dataset_path="unused",
        is_dataset_tokenized=True,
        context_size=args.context,
        prepend_bos=False,
        train_batch_size_tokens=tokens,
        training_tokens=tokens * steps,
        n_batches_in_buffer=max(2, args.batch),
        store_batch_size_prompts=args.batch,
        lr=args.lr,
        device="cpu",
        seed=args.seed,
        checkpoint_path=None,
        n_checkpoints=0,
        n_eval_batches=0,  # evaluated by this script on its own held-out tokens
        output_path=None,
        verbose=False,
        loss=loss,
        logger=LoggingConfig(log_to_wandb=False),
        **extra,
    )


def train(
    args: argparse.Namespace,
    model: Any,
    dataset: Any,
    sae: Any,
    loss: str,
    steps: int,
    **extra: Any,
) -> Any:
    """Train ``sae`` (a copy) with this plugin's runner; return the trained copy."""
    from sae_e2e_plugin import E2ESAETrainingRunner

    cfg = runner_cfg(args, model.cfg.d_model, loss, steps, **extra)
    runner = E2ESAETrainingRunner(
        cfg, override_model=model, override_dataset=dataset, override_sae=copy.deepcopy(sae)
    )
    return runner.run()


@torch.no_grad()
def per_token_stats(
    model: Any,
    final_clean: torch.Tensor,
    final_patched: torch.Tensor,
    tokens: torch.Tensor,
    chunk: int,
    clean_head: Any = None,
) -> dict[str, torch.Tensor]:
    """Per-token KL(orig‖patched), CE clean/patched and the clean log-probs' argmax, chunk by chunk."""
    from sae_e2e_plugin.core.splice import model_head

    head = model_head(model)
    clean_head = clean_head or head
    d_model = final_clean.shape[-1]
    clean = final_clean.reshape(-1, d_model)
    patched = final_patched.reshape(-1, d_model)
    # Next-token targets; the last position of each row has none (masked below).
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], dim=1).reshape(-1)
    kl, ce_clean, ce_patched = [], [], []
    for s in range(0, clean.shape[0], chunk):
        lp_o = F.log_softmax(clean_head(clean[s : s + chunk]).float(), -1)
        lp_p = F.log_softmax(head(patched[s : s + chunk]).float(), -1)
        kl.append((lp_o.exp() * (lp_o - lp_p)).sum(-1))
        t = targets[s : s + chunk]
        ok = t >= 0
        ce_clean.append(torch.where(ok, -lp_o.gather(-1, t.clamp(min=0)[:, None])[:, 0], torch.nan))
        ce_patched.append(
            torch.where(ok, -lp_p.gather(-1, t.clamp(min=0)[:, None])[:, 0], torch.nan)
        )
    return {
        "kl": torch.cat(kl),
        "ce_clean": torch.cat(ce_clean),
        "ce_patched": torch.cat(ce_patched),
    }


def evaluate(
    model: Any,
    sae: Any,
    tokens: torch.Tensor,
    hook: str,
    chunk: int,
    grads: bool,
    clean_autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Splice ``sae`` into ``model`` as the trainer does; per-token stats and the KL's SAE gradient.
    ``clean_autocast``: the clean run's targets at that precision, as ``clean_run_dtype``."""
    from sae_e2e_plugin.core.losses import chunked_kl_orig_to_patched
    from sae_e2e_plugin.core.model_splice import model_head, run_clean_multi, run_patched
    from sae_e2e_plugin.core.multi_splice import MultiSplicePlan
    from sae_e2e_plugin.core.splice import plan_splice, run_prefix

    plan = plan_splice(model, hook, None, d_in=sae.cfg.d_in)
    prefix = run_prefix(model, tokens, plan.start_layer)
    one = MultiSplicePlan.of_one("sae", plan)
    clean = run_clean_multi(model, prefix, one, autocast=clean_autocast).for_sae(plan)
    clean_head = model_head(model, plan, autocast=clean_autocast)
    b, p, d = clean.acts.shape
    sae.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        feats = sae.encode(clean.acts.reshape(b * p, d))
        recon = sae.decode(feats).reshape(b, p, d)
        patched = run_patched(model, prefix, plan, recon)
        out: dict[str, Any] = {}
        if grads:
            kl = chunked_kl_orig_to_patched(
                clean.final_resid.reshape(-1, d),
                patched.final_resid.reshape(-1, d),
                model_head(model, plan),
                chunk,
                orig_to_logits=clean_head,
            )
            kl.backward()
            out["grad"] = {
                n: q.grad.detach().clone() for n, q in sae.named_parameters() if q.grad is not None
            }
    out["stats"] = per_token_stats(
        model, clean.final_resid, patched.final_resid.detach(), tokens, chunk, clean_head
    )
    out["final_clean"] = clean.final_resid  # in the dtype its head reads
    out["clean_head"] = clean_head
    out["l0"] = float((feats > 0).float().sum(-1).mean())
    return out


def summarise(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    ce_c, ce_p = stats["ce_clean"], stats["ce_patched"]
    return {
        "kl_orig_patched": float(stats["kl"].mean()),
        "ce_clean": float(ce_c.nanmean()),
        "ce_patched": float(ce_p.nanmean()),
        "ce_increase": float((ce_p - ce_c).nanmean()),
    }


@torch.no_grad()
def noise_floor(e32: dict[str, Any], e16: dict[str, Any], chunk: int) -> float:
    """Mean per-token KL(p_fp32 ‖ p_bf16) of the clean model: how far bf16 alone moves the output."""
    h32, h16 = e32["clean_head"], e16["clean_head"]
    r32, r16 = e32["final_clean"], e16["final_clean"]
    a, b = r32.reshape(-1, r32.shape[-1]), r16.reshape(-1, r16.shape[-1])
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        lp32 = F.log_softmax(h32(a[s : s + chunk]).float(), -1)
        lp16 = F.log_softmax(h16(b[s : s + chunk]).float(), -1)
        total += float((lp32.exp() * (lp32 - lp16)).sum())
    return total / a.shape[0]


def compare_grads(g32: dict[str, torch.Tensor], g16: dict[str, torch.Tensor]) -> dict[str, Any]:
    # float64: a float32 cosine over millions of elements can come out above 1.
    flat32 = torch.cat([g32[n].flatten() for n in sorted(g32)]).double()
    flat16 = torch.cat([g16[n].flatten() for n in sorted(g32)]).double()
    per = {
        n: round(float(F.cosine_similarity(g32[n].flatten(), g16[n].flatten(), dim=0)), 5)
        for n in sorted(g32)
    }
    return {
        "grad_cosine_all": round(float(F.cosine_similarity(flat32, flat16, dim=0)), 6),
        "grad_cosine_per_param": per,
        "grad_norm_ratio_bf16_over_fp32": round(float(flat16.norm() / flat32.norm()), 5),
        "grad_rel_error": round(float((flat16 - flat32).norm() / flat32.norm()), 5),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("auto", "smollm2-135m", "gpt2-shaped"), default="auto")
    p.add_argument("--layer", type=int, default=None, help="default: the middle block")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="sequences per training step")
    p.add_argument("--eval-seqs", type=int, default=16)
    p.add_argument("--dict-ratio", type=int, default=8)
    p.add_argument(
        "--sae-path",
        default=None,
        help="a trained SAE folder (SAELens format, e.g. a sweep run) to compare with, "
        "instead of pre-training one; its hook sets the layer",
    )
    p.add_argument("--local-steps", type=int, default=150)
    p.add_argument(
        "--l1", type=float, default=5e-3, help="L1 coefficient of the local pre-training"
    )
    p.add_argument("--e2e-steps", type=int, default=0)
    p.add_argument("--e2e-l1", type=float, default=5e-4, help="L1 coefficient of the e2e runs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-chunk", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--clean-run-dtype",
        choices=("bfloat16",),
        default=None,
        help="compare a float32 model with its clean run's targets in bf16 (clean_run_dtype) "
        "instead of with a bf16 model",
    )
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    model32, train_set, eval_tokens, description = load_model_and_data(args)
    model32.eval()
    for q in model32.parameters():
        q.requires_grad_(False)
    loaded = None
    if args.sae_path:
        from sae_lens import TrainingSAE

        loaded = TrainingSAE.load_from_disk(args.sae_path)
        args.layer = int(loaded.cfg.metadata.hook_name.split(".")[1])
        args.dict_ratio = loaded.cfg.d_sae // model32.cfg.d_model
    if args.layer is None:
        args.layer = model32.cfg.n_layers // 2
    hook = f"blocks.{args.layer}.hook_resid_pre"
    result: dict[str, Any] = {
        "model": description,
        "hook": hook,
        "eval_tokens": list(eval_tokens.shape),
        "dict_size": args.dict_ratio * model32.cfg.d_model,
        "machine": machine(),
    }

    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    torch.manual_seed(args.seed)
    sae0 = StandardTrainingSAE(
        StandardTrainingSAEConfig(
            d_in=model32.cfg.d_model,
            d_sae=args.dict_ratio * model32.cfg.d_model,
            l1_coefficient=args.l1,
            apply_b_dec_to_input=False,
        )
    )
    if loaded is not None:
        sae = loaded
        result["sae"] = args.sae_path
    else:
        sae = train(args, model32, train_set, sae0, "local", args.local_steps)
        result["local_pretraining_steps"] = args.local_steps

    # What is lowered: the whole model (lm_dtype), or only the clean run's targets.
    lowered = "bf16_clean_run" if args.clean_run_dtype else "bf16_model"
    result["compared"] = f"fp32_model against {lowered}"
    e32 = evaluate(model32, sae, eval_tokens, hook, args.kl_chunk, grads=True)
    if args.clean_run_dtype:
        low = getattr(torch, args.clean_run_dtype)
        e16 = evaluate(model32, sae, eval_tokens, hook, args.kl_chunk, True, clean_autocast=low)
        extra16: dict[str, Any] = {"clean_run_dtype": args.clean_run_dtype}
    else:
        model16 = copy.deepcopy(model32).to(torch.bfloat16)
        e16 = evaluate(model16, sae, eval_tokens, hook, args.kl_chunk, grads=True)
        extra16 = {"lm_dtype": "bfloat16"}
    kl32, kl16 = e32["stats"]["kl"], e16["stats"]["kl"]
    result["same_sae"] = {
        "l0": {"fp32": e32["l0"], "bf16": e16["l0"]},
        "fp32_model": summarise(e32["stats"]),
        lowered: summarise(e16["stats"]),
        "kl_rel_diff": float((kl16.mean() - kl32.mean()) / kl32.mean()),
        "kl_per_token_mean_abs_diff": float((kl16 - kl32).abs().mean()),
        "kl_per_token_corr": float(torch.corrcoef(torch.stack([kl32, kl16]))[0, 1]),
        "noise_floor_kl_fp32_to_bf16_clean": noise_floor(e32, e16, args.kl_chunk),
        **compare_grads(e32["grad"], e16["grad"]),
    }

    if args.e2e_steps:
        trained: dict[str, Any] = {}
        for name, extra in (("fp32", {"lm_dtype": "float32"}), ("bf16", extra16)):
            start = time.perf_counter()
            lm = copy.deepcopy(model32)  # the runner casts the model in place
            trained[name] = train(args, lm, train_set, sae, "e2e", args.e2e_steps, **extra)
            trained[name + "_s"] = time.perf_counter() - start
            del lm
        result["e2e_training"] = {
            "steps": args.e2e_steps,
            "tokens_per_step": args.batch * args.context,
        }
        for name in ("fp32", "bf16"):
            ev = evaluate(model32, trained[name], eval_tokens, hook, args.kl_chunk, grads=False)
            label = "fp32_model" if name == "fp32" else lowered
            result["e2e_training"][f"trained_with_{label}"] = {
                **summarise(ev["stats"]),
                "l0": ev["l0"],
                "train_s": round(trained[name + "_s"], 1),
            }
        w32 = torch.cat([q.flatten() for q in trained["fp32"].parameters()])
        w16 = torch.cat([q.flatten() for q in trained["bf16"].parameters()])
        w0 = torch.cat([q.flatten() for q in sae.parameters()])
        result["e2e_training"]["update_cosine_fp32_vs_bf16"] = float(
            F.cosine_similarity(w32 - w0, w16 - w0, dim=0)
        )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
