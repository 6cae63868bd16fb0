"""Shared pieces of the benchmarks: the GPT-2-small-shaped model, token batches, measurements.

Both implementations are measured on the same model: ``gpt2_shaped_model(seed)`` builds
a HookedTransformer with GPT-2 small's shape and random weights; the seed fixes every
weight, so two processes that call it with the same seed hold identical weights (each
benchmark prints ``weights_checksum`` to show it).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

GPT2_SMALL_SHAPE: dict[str, Any] = dict(
    n_layers=12,
    d_model=768,
    n_heads=12,
    d_head=64,
    d_mlp=3072,
    d_vocab=50257,
    n_ctx=1024,
    act_fn="gelu_new",
    normalization_type="LN",
)
"""GPT-2 small's shape (TransformerLens names)."""

TINY_SHAPE: dict[str, Any] = dict(
    n_layers=3,
    d_model=32,
    n_heads=2,
    d_head=16,
    d_mlp=64,
    d_vocab=101,
    n_ctx=64,
    act_fn="gelu_new",
    normalization_type="LN",
)
"""A tiny model of the same kind, for smoke tests of the benchmark scripts."""

SHAPES = {"gpt2-small": GPT2_SMALL_SHAPE, "tiny": TINY_SHAPE}

DICT_RATIO = 16
"""Dictionary size as a multiple of d_model (16 × 768 = 12288 features)."""


def gpt2_shaped_model(seed: int = 0, shape: str = "gpt2-small") -> HookedTransformer:
    """GPT-2 small's shape (or ``shape="tiny"``) with random weights fixed by ``seed``, in eval
    mode, fp32, on the CPU."""
    cfg = HookedTransformerConfig(**SHAPES[shape], seed=seed, device="cpu")
    model = HookedTransformer(cfg)
    return model.eval()


def placeholder_dataset(batch: int, seq: int) -> Any:
    """The dataset a runner's activation store needs; the benchmarks feed their own batches."""
    from datasets import Dataset

    return Dataset.from_dict({"tokens": [[0] * seq] * max(2, batch)})


def step_only_fields(batch: int, seq: int, steps: int, seed: int) -> dict[str, Any]:
    """Runner-config fields for a benchmark that times steps on its own token batches: a
    placeholder dataset of ``batch`` sequences of ``seq`` tokens, ``steps`` steps, and no
    checkpoints, evaluation, output folder or wandb."""
    from sae_lens import LoggingConfig

    return dict(
        dataset_path="unused",
        is_dataset_tokenized=True,
        context_size=seq,
        prepend_bos=False,
        train_batch_size_tokens=batch * seq,
        training_tokens=batch * seq * steps,
        n_batches_in_buffer=max(2, batch),
        store_batch_size_prompts=batch,
        seed=seed,
        checkpoint_path=None,
        n_checkpoints=0,
        n_eval_batches=0,
        output_path=None,
        verbose=False,
        logger=LoggingConfig(log_to_wandb=False),
    )


def bare_trainer(cfg: Any, model: Any, batch: int, timer: Any = None) -> Any:
    """The ``E2ETrainer`` that ``E2ESAETrainingRunner(cfg).run()`` (or the multi runner's, for
    an ``E2EMultiRunnerConfig``) trains with, for ``model``, writing no files; the benchmark
    calls ``one_step`` on its own batches."""
    from sae_e2e_plugin import E2EMultiRunnerConfig, E2EMultiSAETrainingRunner, E2ESAETrainingRunner

    several = isinstance(cfg, E2EMultiRunnerConfig)
    runner_class = E2EMultiSAETrainingRunner if several else E2ESAETrainingRunner
    dataset = placeholder_dataset(batch, cfg.context_size)
    runner = runner_class(cfg, override_model=model, override_dataset=dataset)
    if timer is not None:
        runner.timer = timer
    return runner.build_trainer()


def one_step(trainer: Any, tokens: torch.Tensor) -> dict[str, Any]:
    """What ``E2ETrainer.fit`` does around its step, minus logging and checkpoints: each SAE's
    training output by name."""
    for inner in trainer.trainers.values():
        inner.maybe_reset_sparsity()
    outputs = trainer.step(tokens)
    for inner in trainer.trainers.values():
        inner.n_training_steps += 1
    trainer.n_training_steps += 1
    return outputs


def weights_checksum(model: torch.nn.Module) -> float:
    """A float that changes with any weight: sum over parameters of (index+1) · mean(parameter)."""
    with torch.no_grad():
        return float(sum((i + 1) * p.double().mean() for i, p in enumerate(model.parameters())))


def token_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 1234) -> torch.Tensor:
    """``n`` batches of uniformly random token ids, [n, batch, seq]; identical for a given seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, batch, seq), generator=gen)


def current_rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    return sum(fields) - fields[3] - fields[4]


class OtherLoad:
    """CPU time used by *other* processes while a block runs (busy jiffies minus our own CPU).

    ``fraction`` is that time over wall time × CPUs: 0 on a quiet machine. A shared machine
    whose other jobs take CPU during a measurement slows it down (on 2 cores, 2 PyTorch threads
    lose far more than the stolen share); the benchmarks report it next to every figure.
    """

    def __init__(self) -> None:
        self.fraction: float | None = None

    def __enter__(self) -> OtherLoad:
        self._busy = _busy_jiffies()
        self._own = _own_cpu_s()
        self._t = _now()
        return self

    def __exit__(self, *exc: object) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        busy_s = (_busy_jiffies() - self._busy) / hz
        own_s = _own_cpu_s() - self._own
        wall = max(_now() - self._t, 1e-9)
        self.fraction = round(max(busy_s - own_s, 0.0) / (wall * (os.cpu_count() or 1)), 3)


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _now() -> float:
    import time

    return time.perf_counter()


def others_busy_fraction(window_s: float = 2.0) -> float:
    """Share of all CPUs that other processes kept busy over the next ``window_s`` seconds."""
    import time

    hz = os.sysconf("SC_CLK_TCK")
    b0 = _busy_jiffies()
    time.sleep(window_s)
    return (_busy_jiffies() - b0) / hz / (window_s * (os.cpu_count() or 1))


def wait_until_quiet(threshold: float = 0.1, max_wait_s: float = 300.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` of the CPUs;
    return the last reading."""
    import time

    deadline = time.monotonic() + max_wait_s
    while True:
        busy = others_busy_fraction()
        if busy < threshold or time.monotonic() > deadline:
            return round(busy, 3)


def limit_address_space(gib: float | None) -> None:
    """Cap this process's address space, so running out of memory raises instead of
    waking the kernel's OOM killer (which could pick another process on a shared machine)."""
    if gib is None:
        return
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


class PhaseTimer:
    """Wall seconds spent in named phases of a step (a phase may run several times a step)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        """A GPU's queue is drained at each phase's ends, so a phase is charged its own work."""
        self.seconds: dict[str, float] = defaultdict(float)
        self.memory: dict[str, tuple[float, float]] = {}
        """Phase → (resident GiB at its end, peak resident GiB so far), first step timed."""
        self.enabled = False

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start
            if name not in self.memory:
                self.memory[name] = (
                    round(current_rss_bytes() / 2**30, 2),
                    round(peak_rss_bytes() / 2**30, 2),
                )


def package_version() -> dict[str, Any]:
    """Which code of this package was measured: git HEAD, a hash of its sources, the time."""
    import hashlib
    import subprocess
    import time
    from pathlib import Path

    import sae_e2e_plugin

    # The package actually imported (PYTHONPATH may point at another worktree), every module
    # of it: a hash of the top level alone would miss a change inside a subpackage.
    package = Path(sae_e2e_plugin.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "-C", str(package.parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {
        "git_head": head,
        "package_sources_sha256": digest.hexdigest()[:12],
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a timer must not stop
    before the work it times has run)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_device_memory_gib(device: str) -> float | None:
    """The peak GPU memory torch allocated in this process (None on the CPU: see peak RSS)."""
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on (and the GPU's name and memory when ``device`` is one)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "device": device,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            flags: set[str] = set()
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    info.setdefault("cpu", value.strip())
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
        # bf16 matrix products are several times faster with these than without
        info["cpu_bf16"] = sorted(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return info


def finish_result(result: dict[str, Any], device: str, t0: float) -> dict[str, Any]:
    """A benchmark process's closing figures (load at the end, wall time, peak memory) added to
    ``result``, printed as one JSON line, and returned."""
    result["loadavg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    result["peak_rss_gib"] = round(peak_rss_bytes() / 2**30, 3)
    result["peak_gpu_mem_gib"] = peak_device_memory_gib(device)
    print(json.dumps(result), flush=True)
    return result
