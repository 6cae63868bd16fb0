"""A fixed set of tiny-model runs whose exported weights are pinned (``tests/pinned/``).

The weights were recorded with the code before the single- and several-SAE stacks were merged
into one (``python tests/pinned_runs.py record``); ``test_pinned_weights`` trains every case
again and requires the same weights. Each case is a function of nothing but its name: the tiny
model, the data and the config are rebuilt from fixed seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sae_lens
import torch
from conftest import CONTEXT, D_MODEL, make_cfg, tiny_model, token_dataset
from safetensors.torch import load_file, save_file

from sae_e2e_plugin import E2EMultiRunnerConfig, E2EMultiSAETrainingRunner, E2ESAETrainingRunner

PINNED = Path(__file__).parent / "pinned"
MANIFEST = PINNED / "manifest.json"
STEPS = 4
SEQUENCES = 4

ARCHITECTURES: dict[str, Callable[[], Any]] = {
    "standard": lambda: sae_lens.StandardTrainingSAEConfig(
        d_in=D_MODEL, d_sae=32, l1_coefficient=1e-3
    ),
    "topk": lambda: sae_lens.TopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=3),
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=3),
    "jumprelu": lambda: sae_lens.JumpReLUTrainingSAEConfig(d_in=D_MODEL, d_sae=32),
}
LOSSES = ("local", "e2e", "e2e_downstream")
MULTI_HOOKS = {"a": "blocks.0.hook_resid_post", "b": "blocks.1.hook_resid_post"}


def _single_cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {
        f"{arch}-{loss}": {"arch": arch, "loss": loss} for arch in ARCHITECTURES for loss in LOSSES
    }
    cases["standard-e2e-seqpos"] = {"arch": "standard", "loss": "e2e", "seqpos_slice": (1, None)}
    cases["batchtopk-e2e_downstream-seqpos"] = {
        "arch": "batchtopk",
        "loss": "e2e_downstream",
        "seqpos_slice": (2, None),
    }
    cases["topk-e2e-excluding"] = {
        "arch": "topk",
        "loss": "e2e",
        "exclude_special_tokens": [0, 1, 2],
    }
    cases["standard-e2e-half-adaptive"] = {
        "arch": "standard",
        "loss": "e2e",
        "e2e_fraction": 0.5,
        "kl_mse_balance": "adaptive",
    }
    cases["jumprelu-e2e_downstream-blocks"] = {
        "arch": "jumprelu",
        "loss": "e2e_downstream",
        "checkpoint_blocks": True,
    }
    return cases


SINGLE_CASES = _single_cases()
MULTI_CASES: dict[str, dict[str, Any]] = {
    "multi-independent-e2e_downstream": {
        "splice": "independent",
        "archs": ("standard", "batchtopk"),
        "loss": "e2e_downstream",
    },
    "multi-joint-e2e": {"splice": "joint", "archs": ("topk", "standard"), "loss": "e2e"},
    "multi-joint-e2e-seqpos": {
        "splice": "joint",
        "archs": ("standard", "jumprelu"),
        "loss": "e2e",
        "seqpos_slice": (1, None),
    },
    "multi-independent-local": {
        "splice": "independent",
        "archs": ("jumprelu", "topk"),
        "loss": "local",
    },
}
DISTRIBUTED_CASES = ("standard-e2e", "multi-joint-e2e")
"""Cases also pinned as two gloo ranks (``dist-<case>``)."""


def _length() -> dict[str, Any]:
    return dict(training_tokens=STEPS * SEQUENCES * CONTEXT, n_checkpoints=0, n_eval_batches=0)


SAELENS_ARITHMETIC: dict[str, bool] = {"sparse_topk": False, "fused_adam": False}
"""The options that keep SAELens' own arithmetic. The weights were pinned before the sparse
TopK forward pass (``core.sparse_topk``) and torch's fused Adam kernel
(``training.loop.adam_kernel``) became the defaults; each sums in another order."""


def single_runner(folder: Path, case: str, **options: bool) -> E2ESAETrainingRunner:
    fields = {**SINGLE_CASES[case], **SAELENS_ARITHMETIC, **options}
    arch = fields.pop("arch")
    cfg = make_cfg(folder, sae_cfg=ARCHITECTURES[arch](), **_length(), **fields)
    return E2ESAETrainingRunner(cfg, override_model=tiny_model(), override_dataset=token_dataset())


def multi_runner(folder: Path, case: str, **options: bool) -> E2EMultiSAETrainingRunner:
    fields = {**MULTI_CASES[case], **SAELENS_ARITHMETIC, **options}
    archs, splice = fields.pop("archs"), fields.pop("splice")
    saes = {name: ARCHITECTURES[arch]() for name, arch in zip(MULTI_HOOKS, archs, strict=True)}
    base = make_cfg(folder).to_dict()
    keep = ("model_name", "dataset_path", "is_dataset_tokenized", "context_size", "prepend_bos")
    keep += ("train_batch_size_tokens", "n_batches_in_buffer", "store_batch_size_prompts", "lr")
    keep += ("device", "seed", "checkpoint_path", "output_path", "verbose")
    cfg = E2EMultiRunnerConfig(
        saes=saes,  # type: ignore[arg-type]
        hook_names=MULTI_HOOKS,
        splice=splice,
        logger=sae_lens.LoggingConfig(log_to_wandb=False),
        **{k: base[k] for k in keep},
        **_length(),
        **fields,
    )
    return E2EMultiSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset()
    )


def run_case(folder: Path, case: str, **options: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Train ``case`` in ``folder``; its exported weights, by SAE name ("sae" for one SAE).

    ``options`` override ``SAELENS_ARITHMETIC``, with which the pinned weights are reproduced
    bit for bit; ``sparse_topk=True`` or ``fused_adam=True`` reproduce them to float rounding."""
    if case in SINGLE_CASES:
        single_runner(folder, case, **options).run()
        return {"sae": exported(folder / "output")}
    multi_runner(folder, case, **options).run()
    return {name: exported(folder / "output" / name) for name in MULTI_HOOKS}


def exported(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def machine_key() -> str:
    """What decides the float rounding of these runs: CPU vendor and flags torch uses, threads."""
    vendor = "unknown"
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id") and vendor == "unknown":
                vendor = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma") if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"{platform.machine()}/{vendor}/{'+'.join(isa)}/{capability}/"
        f"threads={torch.get_num_threads()}/torch={torch.__version__}"
    )


WORKER = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from pinned_runs import DISTRIBUTED_CASES, run_case
from sae_e2e_plugin.training.parallel.distributed import launcher_context, shutdown

out = Path(sys.argv[2])
for case in DISTRIBUTED_CASES:
    run_case(out / case, case)
shutdown(launcher_context())
"""


def run_distributed(out: Path) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Every ``DISTRIBUTED_CASES`` case trained by two gloo ranks; rank 0's exports by case."""
    from test_distributed import launch, wait_for

    wait_for(launch(out, "train", worker=WORKER))
    names = {
        case: ["sae"] if case in SINGLE_CASES else list(MULTI_HOOKS) for case in DISTRIBUTED_CASES
    }
    return {
        f"dist-{case}": {
            name: exported(out / case / "output" / ("" if name == "sae" else name))
            for name in names[case]
        }
        for case in DISTRIBUTED_CASES
    }


def record(out: Path) -> None:
    """Train every case here (and in two ranks), and write weights and the manifest."""
    PINNED.mkdir(exist_ok=True)
    manifest: dict[str, Any] = {"machine": machine_key(), "runs": {}}
    runs = {case: run_case(out / case, case) for case in [*SINGLE_CASES, *MULTI_CASES]}
    runs |= run_distributed(out / "distributed")
    for case, weights in runs.items():
        for name, tensors in weights.items():
            key = f"{case}/{name}"
            save_file(tensors, str(PINNED / f"{case}.{name}.safetensors"))
            manifest["runs"][key] = digest(tensors)
            print(key, manifest["runs"][key])
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["record"]:
    import tempfile

    torch.set_num_threads(int(os.environ.get("PIN_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        record(Path(tmp))
