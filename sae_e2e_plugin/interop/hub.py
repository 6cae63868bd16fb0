"""Pretrained SAEs as starting points, and publishing trained SAEs to the Hugging Face Hub.

Starting point (``E2ERunnerConfig.pretrained_sae`` / ``pretrained_sae_id``):
  * a local SAELens folder (``cfg.json`` + ``sae_weights.safetensors``);
  * a local reference-format run folder (``final_config.yaml`` + ``samples_<N>.pt``),
    with ``pretrained_sae_id`` naming the SAE position;
  * a SAELens release from its directory (e.g. ``gpt2-small-res_sle-ajt`` with
    ``pretrained_sae_id="blocks.6.hook_resid_pre"``), or any hub repo in SAELens format
    (``"org/repo"`` with the folder inside it as ``pretrained_sae_id``).
The weights are loaded into a fresh training SAE built from the run's ``sae`` config, after
checking architecture, widths, hook and ``apply_b_dec_to_input`` against the run.

Upload: ``upload_sae(folder, repo_id, sae_id)`` publishes an exported folder with SAELens'
own uploader; ``dry_run=<dir>`` writes exactly the files that would be uploaded instead.
Both send the folder's JSON files without this machine's local paths (``local_paths``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sae_lens import SAE
from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

from sae_e2e_plugin.interop.local_paths import check_relative_id, path_inside, scrub_json_file
from sae_e2e_plugin.interop.safe_load import load_sae_folder
from sae_e2e_plugin.run_files import atomic_write_text

# The files SAELens' uploader sends for each SAE (its allow-list).
UPLOADED_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "runner_cfg.json")


def load_pretrained_sae(
    source: str,
    sae_id: str | None,
    training_cfg: TrainingSAEConfig,
    hook_name: str,
    device: str,
    hook_name_out: str | None = None,
) -> TrainingSAE[Any]:
    """A training SAE for ``training_cfg`` holding the weights of a pretrained SAE (a
    transcoder's for a training transcoder config, whose output hook is ``hook_name_out``)."""
    pretrained = _load_inference_sae(source, sae_id, device)
    _check_compatible(pretrained, training_cfg, (hook_name, hook_name_out), source)
    sae = TrainingSAE.from_dict(training_cfg.to_dict())
    state = {name: tensor.to(device) for name, tensor in pretrained.state_dict().items()}
    sae.process_state_dict_for_loading(state)
    missing, unexpected = sae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"pretrained_sae={source!r}: its weights ({sorted(state)}) do not fit a "
            f"{training_cfg.architecture()!r} training SAE (missing {missing}, unexpected "
            f"{unexpected}). Set sae.architecture to the architecture it was trained with."
        )
    sae.cfg.metadata.pretrained_from = f"{source}:{sae_id}" if sae_id else source
    return sae.to(device)


def _load_inference_sae(source: str, sae_id: str | None, device: str) -> SAE[Any]:
    path = Path(source).expanduser()
    # A path-looking source that is not there would otherwise be sent to the hub as a repo id.
    if source.startswith(("/", ".", "~")) and not path.exists():
        raise ValueError(
            f"pretrained_sae={source!r} does not exist; give an existing SAELens or "
            "reference-format folder, a SAELens release name or a hub repo id (org/name)."
        )
    if path.is_dir() and (path / "final_config.yaml").exists():
        from sae_e2e_plugin.interop.reference import reference_format_disk_loader

        if sae_id is None:
            raise ValueError(
                f"pretrained_sae={source!r} is a reference-format run; set pretrained_sae_id "
                "to the SAE position, e.g. 'blocks.6.hook_resid_pre'."
            )
        return load_sae_folder(
            path / sae_id, device, f"pretrained_sae={source!r}", reference_format_disk_loader
        )
    if path.is_dir():
        return load_sae_folder(path, device, f"pretrained_sae={source!r}")
    if sae_id is None:
        raise ValueError(
            f"pretrained_sae={source!r} is not a local folder, so it is read as a SAELens release "
            "or hub repo; set pretrained_sae_id to the SAE's id (the folder inside the repo)."
        )
    return SAE.from_pretrained(source, sae_id, device=device)


def _check_compatible(
    pretrained: SAE[Any], cfg: TrainingSAEConfig, hooks: tuple[str, str | None], source: str
) -> None:
    expected_architecture = cfg.get_inference_config_class().architecture()
    checks = [
        (
            "sae.architecture",
            pretrained.cfg.architecture(),
            expected_architecture,
            f"set sae.architecture to the training architecture of a {pretrained.cfg.architecture()!r} SAE",
        ),
        ("sae.d_in", pretrained.cfg.d_in, cfg.d_in, f"set sae.d_in={pretrained.cfg.d_in}"),
        ("sae.d_sae", pretrained.cfg.d_sae, cfg.d_sae, f"set sae.d_sae={pretrained.cfg.d_sae}"),
        (
            "sae.apply_b_dec_to_input",
            pretrained.cfg.apply_b_dec_to_input,
            cfg.apply_b_dec_to_input,
            f"set sae.apply_b_dec_to_input={pretrained.cfg.apply_b_dec_to_input} (it changes the encoder)",
        ),
    ]
    d_out = getattr(cfg, "d_out", None)
    if d_out is not None:  # a transcoder: its output's width too
        theirs = getattr(pretrained.cfg, "d_out", None)
        checks.append(("sae.d_out", theirs, d_out, f"set sae.d_out={theirs}"))
    for field, ours in zip(("hook_name", "hook_name_out"), hooks, strict=True):
        recorded = getattr(pretrained.cfg.metadata, field, None)
        if recorded is not None:
            checks.append((field, recorded, ours, f"set {field}={recorded!r}"))
    for field, theirs, ours, fix in checks:
        if theirs != ours:
            raise ValueError(
                f"pretrained_sae={source!r} has {field}={theirs!r} but the run has {ours!r}: {fix}."
            )


def upload_sae(
    folder: str | Path, repo_id: str, sae_id: str, *, dry_run: str | Path | None = None
) -> list[Path]:
    """Publish an exported SAE folder to ``repo_id`` under ``sae_id`` with SAELens' uploader.

    With ``dry_run`` nothing is sent: the files the uploader would send (the SAE's files
    under ``<sae_id>/`` and the default README) are written under ``dry_run`` and listed.
    Either way the JSON files go out with local paths replaced by their base names, and
    ``sae_id`` must be a relative path without ``..`` (it names a folder in the repo).
    """
    check_relative_id(sae_id, "sae_id")
    folder = Path(folder)
    for required in UPLOADED_FILES[:2]:
        if not (folder / required).exists():
            raise ValueError(
                f"{folder} has no {required}: pass a folder written by E2ESAETrainingRunner "
                "(output_path) or SAE.save_model."
            )
    if dry_run is None:
        from sae_lens import upload_saes_to_huggingface

        with tempfile.TemporaryDirectory() as staging:
            staged = Path(staging) / "sae"
            _stage(folder, staged)
            upload_saes_to_huggingface({sae_id: staged}, hf_repo_id=repo_id)
        return [folder / name for name in UPLOADED_FILES if (folder / name).exists()]
    return _write_dry_run(folder, repo_id, sae_id, Path(dry_run))


def _stage(folder: Path, target: Path) -> list[Path]:
    """Copy the uploaded files of ``folder`` to ``target``; JSON ones without local paths."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UPLOADED_FILES:
        if not (folder / name).exists():
            continue
        if name.endswith(".json"):
            written.append(scrub_json_file(folder / name, target / name))
        else:
            written.append(Path(shutil.copy2(folder / name, target / name)))
    return written


def _write_dry_run(folder: Path, repo_id: str, sae_id: str, target: Path) -> list[Path]:
    from sae_lens.training.upload_saes_to_huggingface import _create_default_readme

    written = _stage(folder, path_inside(target, sae_id, f"sae_id={sae_id!r}"))
    readme = target / "README.md"
    atomic_write_text(readme, _create_default_readme(repo_id, [sae_id]))
    return [*written, readme]
