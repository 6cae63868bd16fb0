"""The fields that define a run, and resume refused when any of them changed.

Every checkpoint holds the run's whole config as it trained (``runner_cfg.json``, written by
SAELens' runner into each checkpoint folder). A resume compares the fields that decide what
is trained (``IDENTITY_FIELDS`` and every field of the SAE's config but where it lives) with
this run's, and refuses a difference, naming each changed field with its old and new value:
a resume that silently continued another model, hook, SAE shape, objective, schedule or data
would train neither run. Fields outside the identity (output and checkpoint folders, how
often to checkpoint or evaluate, devices, chunk sizes, logging) may change on resume; they
change how a run is carried out, not what it trains.

A checkpoint that has already trained ``training_tokens`` is refused too: resuming it would
train nothing and exit as if it had.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sae_lens.constants import RUNNER_CFG_FILENAME

from sae_e2e_plugin.run_files import CHECKPOINT_COMPLETE_FILENAME
from sae_e2e_plugin.training.loop.checkpoints import ResumeError

logger = logging.getLogger(__name__)

IDENTITY_FIELDS = (
    "model_name",
    "model_class_name",
    "hook_name",
    "hook_names",
    "hook_name_out",
    "hook_names_out",
    "hook_head_index",
    "splice",
    "dataset_path",
    "is_dataset_tokenized",
    "context_size",
    "prepend_bos",
    "disable_concat_sequences",
    "seqpos_slice",
    "exclude_special_tokens",
    "seed",
    "training_tokens",
    "train_batch_size_tokens",
    "lr",
    "lr_scheduler_name",
    "lr_warm_up_steps",
    "lr_decay_steps",
    "lr_end",
    "n_restart_cycles",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "loss",
    "kl_coefficient",
    "downstream_coefficient",
    "downstream_hooks",
    "local_mse_coefficient",
    "e2e_fraction",
    "kl_mse_balance",
    "pretrained_sae",
    "pretrained_sae_id",
)
"""The run config's fields that decide what a run trains (besides the SAE's own fields)."""

SAE_FIELDS_FREE = frozenset({"device", "metadata"})
"""Fields of the SAE's config that may change on resume (where it lives; what SAELens records)."""


def run_identity(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The identity of the run whose ``to_dict()`` is ``cfg_dict``: dotted field -> value
    (JSON values: tuples as lists), SAE fields as ``sae.<field>`` (several SAEs:
    ``saes.<name>.<field>``)."""
    plain = json.loads(json.dumps(cfg_dict, default=str))
    identity = {name: plain[name] for name in IDENTITY_FIELDS if name in plain}
    saes = {"sae": plain["sae"]} if isinstance(plain.get("sae"), dict) else {}
    if isinstance(plain.get("saes"), dict):
        saes |= {f"saes.{name}": sae for name, sae in plain["saes"].items()}
    for prefix, sae in saes.items():
        if isinstance(sae, dict):
            identity |= {
                f"{prefix}.{name}": value
                for name, value in sae.items()
                if name not in SAE_FIELDS_FREE
            }
    return identity


def check_resume_identity(checkpoint: Path | None, cfg: Any) -> None:
    """Refuse resuming ``checkpoint`` with ``cfg`` when a field of the run's identity differs,
    or when the checkpoint has already trained ``cfg.training_tokens`` (None: not resuming)."""
    if checkpoint is None:
        return
    field = f"resume_from_checkpoint={str(checkpoint)!r}"
    record = checkpoint / RUNNER_CFG_FILENAME
    if record.is_file():
        saved = _read_record(record, field)
        before, now = run_identity(saved), run_identity(cfg.to_dict())
        # A field the checkpoint does not record (written by an older version) is not compared.
        changed = [name for name in before if name in now and before[name] != now[name]]
        if changed:
            shown = "; ".join(f"{n}: {before.get(n)!r} -> {now.get(n)!r}" for n in changed)
            raise _resume_error(
                f"{field} was written by a different run: {shown}. A resume continues the "
                "same run; set these fields back to the checkpoint's values, or start a new "
                "run without resume_from_checkpoint (docs/training.md, 'Resuming')."
            )
    else:
        logger.warning(f"{field} has no {RUNNER_CFG_FILENAME}; its config is not checked")
    tokens_seen = _tokens_seen(checkpoint)
    if tokens_seen is not None and tokens_seen >= cfg.training_tokens:
        raise _resume_error(
            f"{field} has already trained {tokens_seen} tokens and training_tokens="
            f"{cfg.training_tokens}: nothing is left to train. That run is finished (its SAE is "
            "in its output_path); start a new run to train another."
        )


def _tokens_seen(checkpoint: Path) -> int | None:
    """The tokens the checkpoint had trained (its completion marker), if it says."""
    try:
        marker = json.loads((checkpoint / CHECKPOINT_COMPLETE_FILENAME).read_text())
        return int(marker["n_training_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_record(record: Path, field: str) -> dict[str, Any]:
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise _resume_error(
            f"{field}: its {record.name} cannot be read ({type(error).__name__}: {error}); the "
            "checkpoint was damaged after it was written. Resume from an earlier checkpoint."
        ) from None
    if not isinstance(saved, dict):
        raise _resume_error(f"{field}: its {record.name} is not a mapping of config fields.")
    return saved


def _resume_error(message: str) -> ValueError:
    return ResumeError(message)
