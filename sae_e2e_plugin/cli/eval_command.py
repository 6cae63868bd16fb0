"""``sae-e2e eval``: an SAE evaluated spliced into its model, on the positions it was trained on.

The result is printed; it is written only to ``--output``, never to the current folder unasked
(run from inside a run folder, a default ``eval.json`` would replace the run's own). An
existing ``--output`` file is replaced only with ``--overwrite``, and the output is checked
to be writable before the model is loaded, so a long evaluation never ends in a refusal.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from sae_e2e_plugin.cli.field_help import add_model_flags
from sae_e2e_plugin.run_files import atomic_write_text


def add_eval_command(commands: Any) -> None:
    """The ``eval`` sub-command's parser."""
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a SAELens-format SAE or transcoder (local folder or hub release) on "
        "held-out text",
        description="Evaluate a SAELens SAE spliced into its model: CE-loss increase, KL, L0, "
        "alive features, explained variance, downstream MSE. A transcoder reads hook_name and "
        "replaces the MLP output at hook_name_out: its explained variance is of that output, "
        "and its zero ablation zeroes it. Model, hooks, context size and data default to what "
        "the SAE's metadata records.",
    )
    evaluate.add_argument(
        "sae",
        nargs="+",
        help="a folder with cfg.json + sae_weights.safetensors, or a SAELens release name; "
        "several folders, or a run folder holding one folder per SAE, are spliced in together "
        "(the joint table: CE-loss increase, KL, all zeroed, each SAE's L0, alive features "
        "and explained variance)",
    )
    evaluate.add_argument(
        "--sae-id", help="the SAE id within a release (e.g. blocks.6.hook_resid_pre)"
    )
    add_model_flags(
        evaluate,
        "model to splice into (default: the SAE's metadata)",
        "hook to splice at (default: the SAE's metadata)",
    )
    evaluate.add_argument(
        "--hook_name_out",
        help="a transcoder's output hook, the MLP output it replaces, e.g. "
        "blocks.6.hook_mlp_out (default: the transcoder's metadata)",
    )
    evaluate.add_argument(
        "--dataset_path", help="a built-in corpus (its eval split) or a Hugging Face dataset"
    )
    evaluate.add_argument(
        "--context_size",
        type=positive_int,
        help="tokens per sequence (default: the SAE's metadata, else 128)",
    )
    evaluate.add_argument(
        "--n_sequences",
        type=positive_int,
        default=64,
        help="held-out sequences to evaluate (default 64)",
    )
    evaluate.add_argument(
        "--batch_size", type=positive_int, default=8, help="sequences per batch (default 8)"
    )
    evaluate.add_argument(
        "--alive_window_tokens",
        type=positive_int,
        default=None,
        help="tokens for the alive count (default: all evaluated)",
    )
    evaluate.add_argument(
        "--lm_dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype for the model",
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the result as JSON to this file (default: print it only)",
    )
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace an existing --output file"
    )
    evaluate.add_argument(
        "--seqpos_slice",
        type=parse_seqpos_slice,
        default=None,
        help="positions to splice the SAE into, START:STOP[:STEP] as a Python slice (default: "
        "the positions the SAE's metadata records it was trained on)",
    )
    evaluate.set_defaults(command="eval", handler=run_eval)


def positive_int(text: str) -> int:
    """A count flag: a whole number >= 1 (argparse names the flag when this refuses)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return value


def parse_seqpos_slice(text: str) -> tuple[int | None, ...]:
    """``"1:"`` -> ``(1, None)``, ``"1:-1"`` -> ``(1, -1)``, ``"::2"`` -> ``(None, None, 2)``."""
    parts = text.split(":")
    try:
        if len(parts) < 2 or len(parts) > 3:
            raise ValueError
        values = tuple(int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not START:STOP[:STEP] (e.g. 1: to leave position 0 out)"
        ) from None
    if len(values) == 3 and values[2] is not None and values[2] <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the step must be >= 1")
    return values


def check_output_file(path: Path | None, overwrite: bool) -> Path | None:
    """``path`` if the evaluation may be written there: not an existing file unless
    ``overwrite``, not a folder, its folder writable. Refused by name otherwise."""
    if path is None:
        return None
    if path.is_dir():
        raise ValueError(
            f"--output {path} is a folder; give a file name, e.g. {path / 'eval.json'}."
        )
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise ValueError(
            f"--output {path} exists; pass --overwrite to replace it, or choose another file."
        )
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {path}: {existing} is not a writable folder.")
    return path


def write_output_file(path: Path, result: dict[str, Any]) -> Path:
    """The result as JSON at ``path``, written atomically (a link there is replaced, not
    followed)."""
    return atomic_write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")


def run_eval(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from sae_e2e_plugin.assets.language_model import load_language_model
    from sae_e2e_plugin.evaluation.evaluate import evaluate_sae

    output = check_output_file(args.output, args.overwrite)  # before the slow part
    saes = _load_saes(args)
    sae = next(iter(saes.values()))
    meta = sae.cfg.metadata
    model_name = args.model_name or meta.model_name
    hook_name = args.hook_name or meta.hook_name
    dataset = args.dataset_path or meta.dataset_path
    context_size = args.context_size or meta.context_size or 128
    for flag, value in (
        ("--model_name", model_name),
        ("--hook_name", hook_name),
        ("--dataset_path", dataset),
    ):
        if not value:
            raise ValueError(f"the SAE's metadata does not record {flag[2:]}; pass {flag}.")
    model = load_language_model(
        model_name,
        model_class_name=args.model_class_name or meta.model_class_name or "HookedTransformer",
        device=args.device,
        model_from_pretrained_kwargs=meta.model_from_pretrained_kwargs,
    )
    if args.lm_dtype:
        model.to(getattr(torch, args.lm_dtype))
    tokens = _eval_tokens(model, sae, dataset, context_size, args.n_sequences)
    several = len(saes) > 1
    chosen: Any = saes if several else sae  # several: spliced in together, a joint table
    result = evaluate_sae(
        chosen,
        model,
        tokens.split(args.batch_size),
        hook_name=None if several else hook_name,
        hook_name_out=args.hook_name_out,
        alive_window_tokens=args.alive_window_tokens,
        seqpos_slice=args.seqpos_slice,
    )
    print(result.format_table())
    if output is None:
        print("not written to a file (pass --output FILE to save it as JSON)")
    else:
        print(f"saved the evaluation to {write_output_file(output, result.to_dict())}")
    return 0


def _load_saes(args: argparse.Namespace) -> dict[str, Any]:
    """The SAEs named on the command line by name: one, several folders (named by their folder),
    or a run folder of several (each sub-folder holding a cfg.json)."""
    sources = list(args.sae)
    if len(sources) == 1 and _run_of_several(Path(sources[0])):
        sources = [str(p) for p in _run_of_several(Path(sources[0]))]
    if len(sources) == 1:
        return {"sae": load_sae_source(sources[0], args.sae_id, args.device)}
    for flag, value in (
        ("--sae-id", args.sae_id),
        ("--hook_name", args.hook_name),
        ("--hook_name_out", args.hook_name_out),
    ):
        if value is not None:
            raise ValueError(
                f"{flag} is for one SAE; several SAEs are each spliced at the hook their "
                "metadata records. Evaluate one SAE to override it."
            )
    names = [Path(source).name for source in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"the SAE folders {sources} share a name; give folders of distinct names.")
    return {
        name: load_sae_source(source, None, args.device)
        for name, source in zip(names, sources, strict=True)
    }


def _run_of_several(folder: Path) -> list[Path]:
    """The SAE folders inside a several-SAE run's output folder (empty for an SAE's folder)."""
    if not folder.is_dir() or (folder / "cfg.json").exists():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "cfg.json").is_file())


def load_sae_source(
    source: str, sae_id: str | None, device: str, field: str = "sae", id_flag: str = "--sae-id"
) -> Any:
    """The SAE a command-line argument names: a local folder (loaded by the loader that names a
    damaged file), or an SAE of a SAELens release (``id_flag`` gives its id)."""
    from sae_lens import SAE

    from sae_e2e_plugin.interop.safe_load import load_sae_folder

    if Path(source).is_dir():
        return load_sae_folder(Path(source), device, f"{field}={source!r}")
    if source.startswith(("/", ".", "~")) or Path(source).exists():  # a path, not a release
        raise ValueError(
            f"{field}={source!r} is not a folder; give the SAE's folder (cfg.json + weights)."
        )
    if sae_id is None:
        raise ValueError(
            f"{field}={source!r} is not a local folder, so it is read as a SAELens release; "
            f"pass {id_flag} (e.g. {id_flag} blocks.6.hook_resid_pre)."
        )
    return SAE.from_pretrained(source, sae_id, device=device)


def _eval_tokens(model: Any, sae: Any, dataset: str, context_size: int, n: int) -> Any:
    import torch
    from sae_lens.training.activations_store import ActivationsStore

    from sae_e2e_plugin.assets.corpora import is_builtin_dataset, load_builtin_dataset

    if is_builtin_dataset(dataset):
        rows = load_builtin_dataset(dataset, model.tokenizer, context_size, split="eval")["tokens"]
        if len(rows) < n:  # fewer sequences than asked would be a smaller evaluation, unsaid
            raise ValueError(
                f"--n_sequences {n}: the eval split of the built-in corpus {dataset!r} holds "
                f"{len(rows)} sequences of {context_size} tokens; pass --n_sequences {len(rows)} "
                "or fewer (or a shorter --context_size)."
            )
        return torch.tensor(rows[:n], dtype=torch.long)
    store = ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=context_size)
    return store.get_batch_tokens(n, move_to_model_device=False)
