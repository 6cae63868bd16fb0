"""Data-parallel e2e training: every rank takes a share of the global batch, all hold one SAE.

``train_batch_size_tokens`` stays the global batch. Every rank draws the same global batch
of whole sequences from the same token stream (so the stream's position, and resume, are
global) and trains on its consecutive share (``training.parallel.distributed.rank_share``). What one
process would compute from the whole batch is rebuilt from the shares:

- gradients: each rank's loss is the mean over its share; the shares are equal, so the mean
  of the ranks' gradients (all-reduced as each parameter's gradient is accumulated, before
  clipping) is the gradient of the mean over the global batch (with excluded token ids the
  SAE's per-row terms are first weighted by the rank's share of the selected rows);
- dead-feature / firing statistics: firing counts and row counts summed over the ranks;
- batch top-k (``batchtopk``, ``matryoshka_batchtopk``): the k × rows largest activations of
  the *global* batch are kept (the cut-off value is found from every rank's candidates), and
  the threshold's moving average uses the global batch's smallest kept activation;
- the logged loss terms: their means over the ranks.

In the local phase of a schedule (``e2e_fraction < 1``) every rank fills the same activation
buffer (same seed, same data) and trains on its rows of the global activation batch.

Every rank therefore updates the same SAE from the same numbers, up to the order in which
floating-point sums are taken (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput
from sae_lens.training.sae_trainer import SAETrainer

from sae_e2e_plugin.training.parallel.distributed import (
    DistributedContext,
    all_reduce,
    gather_values,
    mean_over_ranks,
)

SUM = dist.ReduceOp.SUM


def any_rank_stops(requested: bool, context: DistributedContext, device: str) -> bool:
    """Whether any rank was asked to stop (SIGINT/SIGTERM) before this step.

    A stop request reaches the ranks at different moments; all stop before the same step, or
    the ranks would wait at different collectives."""
    stop = torch.tensor([float(requested)], device=device)
    all_reduce(stop, context, dist.ReduceOp.MAX, "agreeing whether to stop")
    return bool(stop.item())


def global_loss_means(
    outputs: dict[str, TrainStepOutput], context: DistributedContext
) -> dict[str, TrainStepOutput]:
    """Each output's total and terms replaced by their means over the ranks (one collective
    for every SAE's [1 + terms] numbers)."""
    names = {key: list(output.losses) for key, output in outputs.items()}
    local = torch.stack(
        [
            value.detach()
            for key, output in outputs.items()
            for value in (output.loss, *(output.losses[n] for n in names[key]))
        ]
    )
    means = iter(mean_over_ranks(local, context, "averaging the loss terms"))
    global_outputs = {}
    for key, output in outputs.items():
        loss = next(means)
        losses = {name: next(means) for name in names[key]}
        global_outputs[key] = dataclasses.replace(output, loss=loss, losses=losses)
    return global_outputs


def weigh_by_rows(output: TrainStepOutput, context: DistributedContext) -> TrainStepOutput:
    """The SAE's terms weighted by this rank's share of the global batch's selected rows.

    They are means over this rank's selected rows; with excluded token ids the ranks select
    different numbers of rows, and the global mean over rows weighs each rank's mean by its
    rows: n_rank × world / n_global (1 when all are equal)."""
    rows = torch.tensor([float(output.feature_acts.shape[0])], device=output.loss.device)
    total = all_reduce(rows.clone(), context, dist.ReduceOp.SUM, "counting rows")
    weight = (rows * context.world_size / total)[0]
    losses = {name: term * weight for name, term in output.losses.items()}
    return dataclasses.replace(output, loss=output.loss * weight, losses=losses)


def average_gradient(parameter: torch.Tensor, context: DistributedContext) -> None:
    """A parameter's accumulated gradient replaced by its mean over the ranks (a
    post-accumulate-grad hook, so the all-reduce overlaps the rest of the backward pass)."""
    assert parameter.grad is not None
    all_reduce(parameter.grad, context, dist.ReduceOp.SUM, "averaging gradients")
    parameter.grad.div_(context.world_size)


@torch.no_grad()
def update_global_feature_statistics(
    trainer: SAETrainer[Any, Any], feature_acts: torch.Tensor, context: DistributedContext
) -> None:
    """SAETrainer's dead-feature bookkeeping with the counts of the global batch."""
    # [d_sae + 1] = per-feature firing counts, then the rows seen, summed in one collective.
    firing = feature_acts.bool().float()
    per_feature = firing.sum(0)
    if per_feature.is_sparse:
        per_feature = per_feature.to_dense()
    rows = torch.tensor([float(firing.shape[0])], device=per_feature.device)
    counts = all_reduce(
        torch.cat([per_feature, rows]), context, dist.ReduceOp.SUM, "summing the firing statistics"
    )
    fired = counts[:-1]
    since_fired: torch.Tensor = trainer.n_forward_passes_since_fired
    since_fired.add_(1).masked_fill_(fired > 0, 0)
    trainer.act_freq_scores += fired
    trainer.n_frac_active_samples += int(counts[-1].item())


def make_batch_level_state_global(sae: TrainingSAE[Any], context: DistributedContext) -> None:
    """Make an architecture's batch-level computations see the global batch.

    Batch top-k is the one SAELens architecture whose forward pass depends on the whole batch
    (its activation function and its threshold's moving average); the others work row by row.
    """
    if not isinstance(sae, BatchTopKTrainingSAE):
        return
    sae.add_module("activation_fn", GlobalBatchTopK(sae.cfg.k, context))
    update = sae.update_topk_threshold

    def update_from_global_minimum(acts_topk: torch.Tensor) -> None:
        # SAELens' own update, given the smallest positive kept activation of the global batch.
        positive = acts_topk[acts_topk > 0]
        local = positive.min() if positive.numel() else acts_topk.new_tensor(float("inf"))
        smallest = all_reduce(
            local.detach().reshape(1).clone(), context, dist.ReduceOp.MIN, "batch top-k minimum"
        )
        update(smallest if torch.isfinite(smallest).all() else smallest.new_zeros(1))

    vars(sae)["update_topk_threshold"] = update_from_global_minimum


class GlobalBatchTopK(torch.nn.Module):
    """SAELens' ``BatchTopK`` over the global batch: keep the k × (global rows) largest
    activations of all ranks' rows together; this rank returns its rows of the result."""

    def __init__(self, k: float, context: DistributedContext) -> None:
        super().__init__()
        self.k = k
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = x.relu()
        with torch.no_grad():
            rows = torch.tensor([float(acts.shape[:-1].numel())], device=acts.device)
            total = all_reduce(rows, self.context, dist.ReduceOp.SUM, "batch top-k rows")
            n_keep = int(self.k * int(total.item()))
            if n_keep == 0:
                return torch.zeros_like(acts)
            # The global n_keep-th largest value is among each rank's own n_keep largest.
            flat = acts.detach().flatten()
            candidates = torch.topk(flat, min(n_keep, flat.numel())).values.float()
            everything = gather_values(candidates, self.context, "batch top-k candidates")
            cutoff = torch.topk(everything, n_keep).values[-1].to(acts.dtype)
        return acts * (acts >= cutoff)
