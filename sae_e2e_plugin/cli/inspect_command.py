"""``sae-e2e inspect``: a static site of an SAE's features (and a second SAE side by side)."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal

from sae_e2e_plugin.cli.field_help import add_model_flags

DEFAULT_TOKENS = 100_000


def add_inspect_parser(commands: Any) -> None:
    """The ``inspect`` subcommand's flags."""
    from sae_e2e_plugin.features.options import SELECTIONS, InspectOptions

    defaults = InspectOptions()
    sub = commands.add_parser(
        "inspect",
        help="write a static HTML site of an SAE's features (offline; --compare for two SAEs)",
        description="One pass over N tokens (the model runs only up to the SAE's hook) keeps "
        "each feature's top contexts, sampled contexts, frequency and histogram; the chosen "
        "features get a page with their logit table and ablation effect. Model, hook and "
        "corpus default to what the SAE's metadata records.",
    )
    sub.add_argument("--sae", required=True, help="SAE folder (cfg.json + weights) or release")
    sub.add_argument("--sae-id", help="the SAE's id within a release")
    sub.add_argument("--compare", help="a second SAE (folder or release) at the same activation")
    sub.add_argument("--compare-id", help="the second SAE's id within its release")
    sub.add_argument("--out", type=Path, help="site folder (default: ./<SAE name>-inspect)")
    sub.add_argument("--overwrite", action="store_true", help="replace a site written before")
    sub.add_argument(
        "--n-tokens", type=int, default=DEFAULT_TOKENS, help="tokens to read (default 100000)"
    )
    add_model_flags(
        sub, "model (default: the SAE's metadata)", "the SAE's hook (default: its metadata)"
    )
    sub.add_argument("--dataset_path", help="a built-in corpus or a Hugging Face dataset")
    sub.add_argument(
        "--split",
        choices=("train", "eval"),
        default="eval",
        help="a built-in corpus' split (default eval; the train split when eval is too short)",
    )
    sub.add_argument("--context_size", type=int, help="tokens per sequence (default: metadata)")
    sub.add_argument(
        "--select",
        choices=SELECTIONS,
        default=defaults.select,
        help="which features get a page (default random; 'important' ablates every "
        "feature that fired, one patched run per context)",
    )
    sub.add_argument(
        "--n-features",
        type=int,
        default=defaults.n_features,
        help=f"features with a page (default {defaults.n_features})",
    )
    sub.add_argument("--features", help="feature ids for --select ids, e.g. 3,17,42")
    sub.add_argument("--top-k", type=int, default=defaults.top_k, help="top contexts per feature")
    sub.add_argument(
        "--ablation-contexts",
        type=int,
        default=defaults.ablation_contexts,
        help="top contexts each feature is ablated on (0: none)",
    )
    sub.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="sequences per model run"
    )
    sub.add_argument(
        "--no-match-below",
        type=float,
        default=defaults.no_match_below,
        help="cosine under which a feature has no close match (with --compare)",
    )
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="cpu")
    sub.set_defaults(command="inspect", handler=run_inspect)


def run_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.assets.language_model import load_language_model
    from sae_e2e_plugin.cli.eval_command import load_sae_source
    from sae_e2e_plugin.features.dashboard import inspect_sae
    from sae_e2e_plugin.features.site import check_out_folder

    options = _options(args)
    options.check(d_sae=sys.maxsize)  # all but the ids' range, before anything is loaded
    if args.n_tokens < 1:
        raise ValueError(f"--n-tokens must be >= 1, got {args.n_tokens}.")
    out = args.out or Path(f"{_name(args.sae, args.sae_id)}-inspect")
    check_out_folder(out, args.overwrite)
    sae = load_sae_source(args.sae, args.sae_id, args.device, "--sae")
    options.check(sae.cfg.d_sae)
    compare = None
    if args.compare:
        compare = load_sae_source(
            args.compare, args.compare_id, args.device, "--compare", "--compare-id"
        )
    meta = sae.cfg.metadata
    model_name = _required("--model_name", args.model_name or meta.model_name)
    dataset = _required("--dataset_path", args.dataset_path or meta.dataset_path)
    context_size = args.context_size or meta.context_size or 128
    model = load_language_model(
        model_name,
        model_class_name=args.model_class_name or meta.model_class_name or "HookedTransformer",
        device=args.device,
        model_from_pretrained_kwargs=meta.model_from_pretrained_kwargs,
    )
    tokens = _tokens(model, sae, dataset, context_size, args.n_tokens, args.split)
    site = inspect_sae(
        sae,
        model,
        tokens,
        out,
        compare=compare,
        options=options,
        hook_name=args.hook_name,
        metrics=_eval_json(args.sae),
        name=_name(args.sae, args.sae_id),
        compare_name=_name(args.compare, args.compare_id) if args.compare else None,
        overwrite=args.overwrite,
        show_progress=True,
    )
    print(f"wrote the site to {site} (open {site / 'index.html'})")
    return 0


def _options(args: argparse.Namespace) -> Any:
    from sae_e2e_plugin.features.options import InspectOptions

    ids: tuple[int, ...] = ()
    if args.features:
        try:
            ids = tuple(int(part) for part in args.features.split(","))
        except ValueError:
            raise ValueError(
                f"--features {args.features!r} must be comma-separated feature ids, e.g. 3,17,42."
            ) from None
    return InspectOptions(
        select="ids" if ids and args.select == "random" else args.select,
        n_features=args.n_features,
        feature_ids=ids,
        top_k=args.top_k,
        ablation_contexts=args.ablation_contexts,
        batch_size=args.batch_size,
        seed=args.seed,
        no_match_below=args.no_match_below,
    )


def _required(flag: str, value: str | None) -> str:
    if not value:
        raise ValueError(f"the SAE's metadata does not record {flag[2:]}; pass {flag}.")
    return value


def _name(source: str, sae_id: str | None) -> str:
    """A short name for an SAE: its folder's name, or its release and id."""
    if Path(source).is_dir():
        return Path(source).resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{source}-{sae_id}" if sae_id else source)


def _eval_json(source: str) -> dict[str, Any] | None:
    """The evaluation beside a local SAE (``eval.json``), if there is one that reads."""
    from sae_e2e_plugin.run_files import EVAL_FILENAME

    path = Path(source) / EVAL_FILENAME
    if not path.is_file():
        return None
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _tokens(
    model: Any, sae: Any, dataset: str, context_size: int, n_tokens: int, split: str
) -> Any:
    import torch
    from sae_lens.training.activations_store import ActivationsStore

    from sae_e2e_plugin.assets.corpora import is_builtin_dataset, load_builtin_dataset

    n_sequences = math.ceil(n_tokens / context_size)
    if not is_builtin_dataset(dataset):
        store = ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=context_size)
        return store.get_batch_tokens(n_sequences, move_to_model_device=False)
    chosen: Literal["train", "eval"] = "eval" if split == "eval" else "train"
    rows = load_builtin_dataset(dataset, model.tokenizer, context_size, split=chosen)["tokens"]
    if len(rows) < n_sequences and chosen == "eval":
        print(
            f"the eval split of {dataset!r} holds {len(rows)} sequences of {context_size} "
            f"tokens, fewer than the {n_sequences} asked for: reading the train split"
        )
        rows = load_builtin_dataset(dataset, model.tokenizer, context_size, split="train")["tokens"]
    if len(rows) < n_sequences:
        raise ValueError(
            f"--n-tokens {n_tokens} needs {n_sequences} sequences of {context_size} tokens, but "
            f"the built-in corpus {dataset!r} has {len(rows)}; lower --n-tokens."
        )
    return torch.tensor(rows[:n_sequences], dtype=torch.long)
