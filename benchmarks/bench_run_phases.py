"""The phases of a real training run: ``sae-e2e train``'s own runner on a config file, with the
trainer's phase timer on (``sae_e2e_plugin.training.timing``).

Any ``--field value`` after the config overrides it, as on ``sae-e2e train``; a config with
``saes`` trains several SAEs, as there. Prints one JSON
object: the run's wall seconds, its steps, and the seconds spent in each phase over the whole
run (the local phase's steps are SAELens' own and are not split). Example, the README's main
job shortened to 12 steps, without and with the clean run's targets in bf16::

    python benchmarks/bench_run_phases.py --config examples/smollm2_shakespeare_e2e.yaml \\
        --training_tokens 12288 --n_checkpoints 0 --n_eval_batches 0 \\
        --output_path /tmp/phases --overwrite_output true [--clean_run_dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PhaseTimer, machine, package_version  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from sae_e2e_plugin import E2EMultiSAETrainingRunner, E2ESAETrainingRunner
    from sae_e2e_plugin.cli.commands import parse_field_flags
    from sae_e2e_plugin.training.config.fields import (
        config_from_fields,
        load_config_file,
        merge_fields,
        multi_config_from_fields,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a sae-e2e train config")
    args, extra = parser.parse_known_args(argv)
    fields = merge_fields(load_config_file(args.config), parse_field_flags(extra))
    runner: E2ESAETrainingRunner | E2EMultiSAETrainingRunner
    if "saes" in fields:  # as sae-e2e train tells the two kinds of config apart
        cfg = multi_config_from_fields(fields)
        runner = E2EMultiSAETrainingRunner(cfg)
    else:
        cfg = config_from_fields(fields)
        runner = E2ESAETrainingRunner(cfg)
    timer = PhaseTimer(cfg.device)
    timer.enabled = True
    runner.timer = timer
    start = time.perf_counter()
    runner.run()
    result = {
        "benchmark": "run_phases",
        "config": str(args.config),
        "overrides": extra,
        "wall_s": round(time.perf_counter() - start, 2),
        "steps": cfg.total_training_steps,
        "phase_s_total": {name: round(s, 3) for name, s in timer.seconds.items()},
        "machine": machine(cfg.device),
        **package_version(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
