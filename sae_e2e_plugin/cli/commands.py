"""The ``sae-e2e`` command line: ``train``, ``eval``, ``sweep``, ``convert``, ``upload``, ``inspect``.

``train`` takes every ``E2ERunnerConfig`` field as a flag (``--loss e2e``,
``--lr 1e-3``), SAE fields as ``--sae.<field>`` (``--sae.architecture topk
--sae.k 32``) and logger fields as ``--logger.<field>``, optionally on top of a
YAML/JSON file (``--config run.yaml``) holding the same keys. Help texts come
from the fields' own documentation.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sae_e2e_plugin.cli.eval_command import add_eval_command
from sae_e2e_plugin.cli.field_help import fields_help
from sae_e2e_plugin.cli.inspect_command import add_inspect_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sae-e2e`` and ``python -m sae_e2e_plugin``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "train" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _show_library_logs()
    try:
        return int(args.handler(args, extra) or 0)
    except ValueError as error:
        print(f"sae-e2e {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        from tqdm.auto import tqdm

        # Through tqdm: the interrupted run's progress bar is still on the line.
        message = _interrupted(interruption, sweep=args.command == "sweep")
        tqdm.write(f"sae-e2e {args.command}: {message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RuntimeError as error:
        from sae_e2e_plugin.run_files import DiskFullError
        from sae_e2e_plugin.runs.output_folder import FolderInUseError
        from sae_e2e_plugin.training.loop.checkpoints import CheckpointWriteError
        from sae_e2e_plugin.training.loop.sae_trainer import NonFiniteLossError
        from sae_e2e_plugin.training.parallel.distributed import PeerFailure

        known = (
            NonFiniteLossError,
            CheckpointWriteError,
            FolderInUseError,
            PeerFailure,
            DiskFullError,
        )
        if not isinstance(error, known):
            raise
        print(f"sae-e2e {args.command}: error: {error}", file=sys.stderr)
        return 1


EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C / SIGTERM (128 + SIGINT, as shells report it)."""


def _interrupted(interruption: KeyboardInterrupt, sweep: bool = False) -> str:
    checkpoint = getattr(interruption, "checkpoint", None)
    if checkpoint is not None and sweep:  # a sweep finds its runs' checkpoints itself
        return (
            f"interrupted; checkpoint written to {checkpoint}. The same sweep command resumes "
            "the run from it."
        )
    if checkpoint is not None:
        return (
            f"interrupted; checkpoint written to {checkpoint}. Resume with "
            f"--resume_from_checkpoint {checkpoint}"
        )
    if hasattr(interruption, "checkpoint"):  # stopped between steps, checkpointing off
        return "interrupted between steps; checkpointing is off, so nothing was saved."
    return "stopped at once (second Ctrl-C); the latest complete checkpoint is the one to resume."


class _ProgressBarSafeHandler(logging.Handler):
    """Writes log lines to stdout through tqdm, so they do not break a running progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stdout)


def _show_library_logs() -> None:
    """The package logs what a run reports (evaluations, resumes, checkpoints); show it."""
    package_logger = logging.getLogger("sae_e2e_plugin")
    if not any(isinstance(h, _ProgressBarSafeHandler) for h in package_logger.handlers):
        package_logger.addHandler(_ProgressBarSafeHandler())
    package_logger.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-e2e",
        description="Train and evaluate SAEs end to end (KL of the model's outputs) on SAELens.",
    )
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train an SAE (every E2ERunnerConfig field is a flag; see `sae-e2e train --help`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog=fields_help(),
    )
    train.add_argument(
        "--config", type=Path, help="YAML or JSON file of config fields; flags override it"
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    train.set_defaults(command="train", handler=_train)

    add_eval_command(commands)

    sweep = commands.add_parser(
        "sweep",
        help="train and evaluate a grid of runs (loss × sparsity × layer); resumable, and "
        "several processes started on it share its runs",
    )
    sweep.add_argument(
        "--config", type=Path, required=True, help="sweep file: base, grid, output_dir"
    )
    sweep.add_argument(
        "--output",
        type=Path,
        help="output folder (default: the file's output_dir, else sweeps/<file name>)",
    )
    sweep.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sweep.add_argument(
        "--report",
        action="store_true",
        help="train nothing: write the results table and plots of the runs finished so far "
        "(while the sweep's processes go on)",
    )
    sweep.add_argument(
        "--reevaluate",
        action="store_true",
        help="train nothing: evaluate every finished run's SAE again with this version's "
        "evaluation, rewrite its eval.json, then report",
    )
    sweep.set_defaults(command="sweep", handler=_sweep)

    upload = commands.add_parser(
        "upload", help="publish an exported SAE folder to the Hugging Face Hub (SAELens' uploader)"
    )
    upload.add_argument(
        "folder", type=Path, help="a folder with cfg.json + sae_weights.safetensors"
    )
    upload.add_argument("repo_id", help="the hub repo, e.g. your-name/smollm2-e2e-saes")
    upload.add_argument(
        "--sae-id",
        required=True,
        help="the SAE's folder in the repo, e.g. blocks.15.hook_resid_pre",
    )
    upload.add_argument(
        "--dry-run", type=Path, metavar="DIR", help="write what would be uploaded to DIR instead"
    )
    upload.set_defaults(command="upload", handler=_upload)

    convert = commands.add_parser(
        "convert", help="convert a reference-format (e2e_sae) checkpoint to SAELens folders"
    )
    convert.add_argument(
        "src", type=Path, help="folder with final_config.yaml and samples_<N>.pt, or one .pt file"
    )
    convert.add_argument(
        "out", type=Path, help="output folder: one SAELens folder per SAE position"
    )
    convert.set_defaults(command="convert", handler=_convert)
    add_inspect_parser(commands)
    return parser


def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.training.config.fields import load_config_file, merge_fields
    from sae_e2e_plugin.training.parallel.distributed import launcher_context, shutdown

    if not launcher_context().is_main:  # under torchrun, rank 0 alone reports the run
        logging.getLogger("sae_e2e_plugin").setLevel(logging.WARNING)

    fields = load_config_file(args.config) if args.config else {}
    fields = merge_fields(fields, parse_field_flags(extra))
    from sae_e2e_plugin.run_files import DiskFullError
    from sae_e2e_plugin.runs.multi_runner import E2EMultiSAETrainingRunner
    from sae_e2e_plugin.runs.runner import E2ESAETrainingRunner
    from sae_e2e_plugin.training.config.fields import config_from_fields, multi_config_from_fields
    from sae_e2e_plugin.training.config.multi_config import E2EMultiRunnerConfig

    several = "saes" in fields  # several SAEs: saes.<name>.<field>, hook_names, splice
    cfg = multi_config_from_fields(fields) if several else config_from_fields(fields)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return 0
    if isinstance(cfg, E2EMultiRunnerConfig):
        runner: E2ESAETrainingRunner = E2EMultiSAETrainingRunner(cfg)
    else:
        runner = E2ESAETrainingRunner(cfg)
    try:
        runner.run()
    except DiskFullError as error:  # say which checkpoint the same command resumes from
        where = runner.cfg.checkpoint_path
        raise DiskFullError(f"{error} {latest_checkpoint_words(where)}") from None
    shutdown(runner.context)
    if runner.context.is_main:
        for name, folder in runner.export_folders().items():
            if folder is not None:
                who = f"SAE {name!r}" if several else "the SAE"
                print(f"saved {who} (SAELens format) to {folder}")
    return 0


def latest_checkpoint_words(checkpoint_path: str | None) -> str:
    """The latest complete checkpoint under ``checkpoint_path``, in words."""
    from sae_e2e_plugin.training.loop.checkpoints import latest_complete_checkpoint

    latest = latest_complete_checkpoint(Path(checkpoint_path)) if checkpoint_path else None
    if latest is None:
        return "No checkpoint of this run was written."
    return f"The latest complete checkpoint is {latest} (--resume_from_checkpoint {latest})."


def _sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.analysis.results import RESULTS_CSV, results_markdown
    from sae_e2e_plugin.runs.sweep import (
        load_sweep_file,
        reevaluate_sweep,
        report_sweep,
        run_sweep,
    )

    spec = load_sweep_file(args.config)
    output = args.output or Path(spec.get("output_dir") or Path("sweeps") / args.config.stem)
    if args.report and args.reevaluate:
        raise ValueError("--report and --reevaluate: choose one (--reevaluate reports too).")
    sweep = report_sweep if args.report else reevaluate_sweep if args.reevaluate else run_sweep
    rows = sweep(spec, output, plots=not args.no_plots)
    if rows:
        print(results_markdown(rows))
    print(f"{len(rows)} finished runs; results in {output / RESULTS_CSV} (and .json, .md)")
    return 0


def _upload(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.interop.hub import upload_sae

    files = upload_sae(args.folder, args.repo_id, args.sae_id, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    for path in files:
        print(f"{verb}: {path}")
    return 0


def _convert(args: argparse.Namespace, extra: list[str]) -> int:
    from sae_e2e_plugin.interop.reference import convert_reference_checkpoint

    for folder in convert_reference_checkpoint(args.src, args.out):
        print(folder)
    return 0


def parse_field_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """``--a.b value`` / ``--a.b=value`` pairs → nested dict; values parsed as YAML scalars/lists."""
    from sae_e2e_plugin.training.config.fields import nest_dotted

    flat: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}; flags look like --loss e2e.")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"flag --{name} needs a value.")
            value = tokens[i + 1]
            i += 1
        key = name.replace("-", "_")
        if key in flat:  # the last would silently win
            raise ValueError(
                f"flag --{key} is given twice ({flat[key]!r}, {value!r}); give it once."
            )
        flat[key] = parse_value(value)
        i += 1
    return nest_dotted(flat)


def parse_value(text: str) -> Any:
    """A flag's text as a number, bool, null, list/mapping, or else the string itself."""
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)", text):
        return float(text)  # YAML 1.1 reads "1e-3" as a string
    if ":" in text and not text.lstrip().startswith(("{", "[", "'", '"')):
        # A slice (1:, 1:5), not YAML's {1: None} or its base-60 int 65: the field's type
        # reads it (training.config.field_shapes).
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
