"""Data-parallel training of several SAEs per run: every rank takes a share of the global
batch and holds every SAE.

The same rules as one SAE's data-parallel run (``training.data_parallel``), applied SAE by
SAE: each SAE's gradient is averaged over the ranks as it is accumulated (before clipping),
its firing statistics are summed over the ranks, batch top-k sees the global batch, its logged
terms are global means (one collective for all SAEs), and rank 0 alone writes checkpoints.
Both splices work: the ranks run the same passes in the same order, so their collectives meet.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAE, TrainStepOutput

from sae_e2e_plugin.training.data_parallel import (
    any_rank_stops,
    average_gradient,
    global_loss_means,
    make_batch_level_state_global,
    update_global_feature_statistics,
    weigh_by_rows,
)
from sae_e2e_plugin.training.distributed import (
    DistributedContext,
    barrier,
    broadcast_from_main,
    rank_share,
)
from sae_e2e_plugin.training.multi_trainer import E2EMultiSAETrainer


class DataParallelE2EMultiSAETrainer(E2EMultiSAETrainer):
    """``E2EMultiSAETrainer`` for one rank of a process group (see the module docstring)."""

    def __init__(self, *args: Any, context: DistributedContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.context = context
        """This rank's place in the process group."""
        for sae in self.saes.values():
            for parameter in sae.parameters():
                parameter.register_post_accumulate_grad_hook(
                    partial(average_gradient, context=context)
                )
            make_batch_level_state_global(sae, context)
        if not self.step_pass.positions.selects_all:
            self.step_pass.weigh_sae_terms = partial(weigh_by_rows, context=context)

    def fit(self) -> dict[str, TrainingSAE[Any]]:
        """Start every rank from rank 0's SAEs (initialised or resumed), then train."""
        for sae in self.saes.values():
            sae.to(self.cfg.device)
            broadcast_from_main(list(sae.state_dict().values()), self.context)
        return super().fit()

    def step(self, tokens: torch.Tensor) -> dict[str, TrainStepOutput]:
        """One step of every SAE on this rank's share of the global ``tokens`` batch."""
        self.stop_requested = any_rank_stops(self.stop_requested, self.context, self.cfg.device)
        return super().step(tokens)

    def _rows_of_this_process(self, tokens: torch.Tensor) -> torch.Tensor:
        return rank_share(tokens, self.context)

    def _global_outputs(self, outputs: dict[str, TrainStepOutput]) -> dict[str, TrainStepOutput]:
        return global_loss_means(outputs, self.context)

    def _update_feature_statistics(self, name: str, feature_acts: torch.Tensor) -> None:
        update_global_feature_statistics(self.trainers[name], feature_acts, self.context)

    def save_checkpoint(self, checkpoint_name: str) -> None:
        """Rank 0 writes the checkpoint (every rank holds the same state); all wait for it."""
        if self.context.is_main:
            super().save_checkpoint(checkpoint_name)
        barrier(self.context, f"rank 0 writing checkpoint {checkpoint_name}")
        if self.cfg.checkpoint_path is not None:
            self.last_checkpoint = Path(self.cfg.checkpoint_path) / checkpoint_name
