"""The trainer's two data providers, both reading one SAELens ``ActivationsStore``.

- ``TokenBatches``: whole ``(sequences, context_size)`` token sequences for e2e steps
  (``ActivationsStore.get_batch_tokens``).
- ``BufferedActivations``: SAELens' ordinary local path for the local phase of a schedule
  (``next(store)``: the model run up to the hook, activations shuffled in SAELens' mixing
  buffer), with its own random stream and counters so a resumed run sees the same batches.

Both draw sequences from the same store in the order they are used: held-out sequences
(reserved by the runner), the normalisation estimate, the local phase's buffer, the e2e phase.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from sae_lens.training.activations_store import ActivationsStore

from sae_e2e_plugin.training.loop.checkpoints import ResumeError

logger = logging.getLogger(__name__)


class TokenBatches(Iterator[torch.Tensor]):
    """Endless ``(sequences_per_batch, context_size)`` token batches from an ActivationsStore."""

    def __init__(self, store: ActivationsStore, sequences_per_batch: int) -> None:
        self.store = store
        self.sequences_per_batch = sequences_per_batch

    def __next__(self) -> torch.Tensor:
        return self.store.get_batch_tokens(self.sequences_per_batch)

    def skip(self, n_sequences: int) -> None:
        """Draw and drop ``n_sequences`` sequences (resume continues where training stopped)."""
        while n_sequences > 0:
            n = min(n_sequences, self.sequences_per_batch)
            self.store.get_batch_tokens(n, move_to_model_device=False)
            n_sequences -= n


class BufferedActivations(Iterator[Any]):
    """``[train_batch_size_tokens, d_in]`` activation batches from SAELens' activation buffer.

    The buffer shuffles with ``torch.randperm`` on the global generator; each draw here runs
    with a generator state of its own (seeded by the run's seed), so the batches depend only on
    the seed and the data, not on anything else that draws random numbers, and a resumed run
    can rebuild the buffer exactly by replaying the batches already served.
    """

    def __init__(
        self,
        store: ActivationsStore,
        seed: int,
        sequences_per_batch: int,
        hook_d_ins: Mapping[str, int] | None = None,
    ) -> None:
        self.store = store
        self.hook_d_ins = dict(hook_d_ins) if hook_d_ins is not None else None
        """Several SAEs' hooks (and each transcoder's output hook, its target) and widths: each
        batch is ``{hook: [rows, width]}``, the rows of every hook from the same tokens (SAELens'
        multi-hook buffer shuffles them together). None: one hook, one tensor."""
        self._multi_hook_batches: Iterator[dict[str, torch.Tensor]] | None = None
        if self.hook_d_ins is not None:
            # SAELens' multi-hook mode of this same store: one token stream for both phases.
            store._hook_names = list(self.hook_d_ins)
            store._hook_d_ins = dict(self.hook_d_ins)
        # A local step trains on the rows an e2e step trains on: every sequence's selected
        # positions (``seqpos_slice``). The store's buffer holds n_batches_in_buffer × selected
        # positions rows, so a batch of sequences × context_size rows would not fit in it.
        store.train_batch_size_tokens = sequences_per_batch * store.training_context_size
        self.batches = 0
        """Batches served so far."""
        self.sequences = 0
        """Token sequences the buffer has drawn from the store (it reads ahead of what it serves)."""
        # Creating a generator does not touch the global one: e2e_fraction=1 runs are unchanged.
        self._rng_state = torch.Generator().manual_seed(seed).get_state()

    def __next__(self) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng_state)
            batch = self._draw_counting_sequences()
            self._rng_state = torch.get_rng_state()
        self.batches += 1
        return batch

    def _draw_counting_sequences(self) -> Any:
        # The store counts dataset rows, which are not sequences for text data; the e2e phase
        # resumes after exactly the sequences the buffer read, so count them as they are read.
        read_tokens = self.store.get_batch_tokens

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            tokens = read_tokens(*args, **kwargs)
            self.sequences += tokens.shape[0]
            return tokens

        vars(self.store)["get_batch_tokens"] = counted
        try:
            if self.hook_d_ins is None:
                return next(self.store)
            if self._multi_hook_batches is None:
                self._multi_hook_batches = self.store.get_multi_hook_data_loader()
            return next(self._multi_hook_batches)
        finally:
            del vars(self.store)["get_batch_tokens"]

    def state(self) -> dict[str, Any]:
        """The position saved in a checkpoint: batches served, sequences read, the RNG's digest."""
        return {"batches": self.batches, "sequences": self.sequences, "rng": self._digest()}

    def replay(self, state: dict[str, Any]) -> None:
        """Serve and drop ``state["batches"]`` batches, leaving the buffer as the saved run had it.

        The model runs up to the hook for every sequence the buffer read (no SAE work): the
        price of an exact resume inside the local phase.
        """
        if self.batches:
            raise RuntimeError("replay() needs a buffer that has served nothing yet")
        logger.info(f"rebuilding the activation buffer: replaying {state['batches']} local batches")
        for _ in range(int(state["batches"])):
            next(self)
        if self.state() != state:
            raise ResumeError(
                f"the activation buffer replayed to {self.state()}, not to the checkpoint's "
                f"{state}: the data, seed or buffer settings (n_batches_in_buffer, "
                "store_batch_size_prompts, activations_mixing_fraction) differ from the run that "
                "wrote it. Resume with the same settings."
            )

    def _digest(self) -> str:
        return hashlib.sha256(self._rng_state.numpy().tobytes()).hexdigest()[:16]


def reposition(trainer: Any, tokens: TokenBatches, local: BufferedActivations | None) -> None:
    """Put the data streams where the checkpointed run had them.

    The store was read in this order: the normalisation estimate's token batches, the local
    phase's buffer, the e2e phase's token batches. Before the switch the buffer's contents are
    rebuilt by replaying it; after it only the number of sequences it read matters. ``trainer``
    is the run's ``E2ETrainer`` (``saved_local_data``, ``schedule``,
    ``n_steps_taken``, ``n_sequences_consumed``).
    """
    saved = trainer.saved_local_data
    if local is None or saved is None:
        tokens.skip(trainer.n_sequences_consumed)
    elif trainer.schedule.phase(trainer.n_steps_taken) == "local":
        tokens.skip(trainer.n_sequences_consumed)
        local.replay(saved)
    else:
        tokens.skip(trainer.n_sequences_consumed + int(saved["sequences"]))
