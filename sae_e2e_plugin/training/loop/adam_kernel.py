"""Which of torch's Adam kernels updates an SAE (``fused_adam``).

SAELens' ``SAETrainer`` builds ``torch.optim.Adam`` with torch's defaults. On a CPU that is the
single-tensor loop, which passes over every weight matrix about a dozen times per update:
70–90 ms for a 768 → 12,288 SAE on a 2-core EPYC, against about 10 ms for torch's fused kernel
(docs/performance.md, "Fused Adam"). Both compute Adam's update; the fused kernel orders its
float operations differently, so the weights differ by rounding, not more.

The choice is a flag in the optimizer's param groups, and an optimizer's state dict saves its
param groups: ``choose_adam_kernel`` runs after SAETrainer builds the optimizer and again after
a checkpoint's optimizer state is loaded, so a resumed run uses the kernel its own config asks
for, whichever the checkpoint was written with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def fused_adam_unsupported(params: Iterable[torch.Tensor]) -> str | None:
    """Why torch has no fused Adam for these parameters' devices and dtypes; None if it has.

    torch answers by trying: which devices it supports changes between versions (CPUs from
    torch 2.4), so a one-element probe of each device and dtype takes one update.
    """
    for device, dtype in {(p.device, p.dtype) for p in params}:
        probe = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        try:
            torch.optim.Adam([probe], fused=True).step()
        except RuntimeError as error:
            return f"{dtype} on {device}: {str(error).strip().splitlines()[0]}"
    return None


def choose_adam_kernel(optimizer: torch.optim.Optimizer, fused: bool) -> bool:
    """Make ``optimizer`` (an Adam) update with torch's fused kernel, or with torch's default.

    ``fused`` is the config's wish; where torch has no fused kernel for the parameters it
    stays with the default. Returns whether the fused kernel is in use.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused = fused and fused_adam_unsupported(params) is None
    for group in optimizer.param_groups:
        # None is what SAELens builds: torch then picks its loop (foreach on GPUs).
        group["fused"] = True if fused else None
    for param in params:
        state = optimizer.state.get(param, {})
        if torch.is_tensor(state.get("step")):
            # The fused kernel counts steps on the parameter's device; the default loop on the
            # CPU. A checkpoint brings back the count where the kernel that wrote it kept it.
            where = param.device if fused else torch.device("cpu")
            state["step"] = state["step"].to(dtype=torch.float32, device=where)
    return fused
