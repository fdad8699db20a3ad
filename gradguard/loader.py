"""Knowing which dataset examples are in each batch, without changing what the loop receives.

:func:`track_indices` rebuilds a ``DataLoader`` around a batch sampler that records
every list of indices it hands out, in order. Batches come out of a DataLoader in the
order their index lists were drawn (also with worker processes and prefetching), so a
FIFO pairs each batch the loop receives with its dataset indices. Opacus's Poisson
``DPDataLoader`` (variable and empty batches) and ``BatchMemoryManager`` (which splits
our batch sampler's lists into micro-batches) work the same way.
"""

from __future__ import annotations

from collections import deque

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = ["RecordingBatchSampler", "IndexTrackingLoader", "track_indices"]


class RecordingBatchSampler(Sampler):
    """Wraps a batch sampler; every index list it yields is also appended to ``drawn``."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.drawn: deque[list[int]] = deque()

    def __iter__(self):
        self.drawn.clear()  # a new pass starts: lists drawn ahead by an abandoned one are void
        for batch in self.batch_sampler:
            batch = list(batch)
            self.drawn.append(batch)
            yield batch

    def __len__(self):
        return len(self.batch_sampler)

    # Opacus's BatchMemoryManager and DPDataLoader read these off the batch sampler.
    def __getattr__(self, name):
        if name == "batch_sampler":
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


class IndexTrackingLoader:
    """Iterates exactly like the wrapped loader and records the indices of each batch.

    Attributes:
        loader: the rebuilt DataLoader (same dataset, sampler, workers, collate_fn).
        recorder: its :class:`RecordingBatchSampler`.
        consumed: index lists of the batches handed to the loop since the last ``take()``.
    """

    def __init__(self, loader: DataLoader, recorder: RecordingBatchSampler):
        self.loader = loader
        self.recorder = recorder
        self.consumed: list[list[int]] = []

    def __iter__(self):
        self.consumed.clear()
        for batch in self.loader:
            self.consumed.append(self.recorder.drawn.popleft())
            yield batch

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def discard(self) -> None:
        """Forget the batches handed out since the last step: batches the loop skips
        without a step (e.g. those already trained on, when resuming)."""
        self.consumed.clear()

    def discard_oldest(self, n_examples: int) -> None:
        """Forget the oldest batches handed out, ``n_examples`` examples in all: batches
        whose backward passes never reached a step (e.g. a GradScaler skipped it). Nothing
        is forgotten unless whole batches add up to exactly ``n_examples``."""
        total = 0
        for count, batch in enumerate(self.consumed, start=1):
            total += len(batch)
            if total == n_examples:
                del self.consumed[:count]
                return
            if total > n_examples:
                return

    def take(self, batch_size: int, device=None) -> torch.Tensor:
        """Dataset indices of the examples behind the step's ``batch_size`` gradients.

        The batches handed to the loop since the last step, or, when another loader was
        built from our batch sampler (Opacus's BatchMemoryManager), the oldest logical
        batch drawn.

        Raises:
            RuntimeError: the recorded indices do not add up to the step's batch size.
        """
        if self.consumed:
            lists, self.consumed = self.consumed, []
        elif self.recorder.drawn:
            lists = [self.recorder.drawn.popleft()]
        else:
            lists = []
        flat = [i for batch in lists for i in batch]
        if len(flat) != batch_size:
            raise RuntimeError(
                f"gradguard saw {batch_size} per-example gradients in this step but the data "
                f"loader handed out {len(flat)} examples since the last step. Iterate the "
                "loader returned by make_guarded (not the original one), and call "
                "optimizer.step() once per batch (or per logical batch with "
                "BatchMemoryManager); for batches that do not come from that loader, call "
                "guard.set_batch_indices(indices) before optimizer.step()."
            )
        return torch.tensor(flat, dtype=torch.long, device=device)


def track_indices(loader: DataLoader) -> IndexTrackingLoader:
    """Rebuild ``loader`` around a :class:`RecordingBatchSampler`.

    Works for plain DataLoaders (shuffled or not, ``drop_last``, workers) and Opacus's
    ``DPDataLoader``; the rebuilt loader keeps the original's class where it can.

    Raises:
        TypeError: an iterable-style dataset (there are no indices to track).
    """
    # An iterable-style dataset with batch_size still has a batch sampler (over an
    # infinite dummy sampler) that yields no dataset indices.
    if loader.batch_sampler is None or isinstance(loader.dataset, IterableDataset):
        raise TypeError(
            "gradguard tracks examples by dataset index, which needs a map-style dataset "
            "with a batch sampler; this DataLoader has none (iterable-style dataset or "
            "batch_size=None). Call guard.set_batch_indices(indices) before each step instead."
        )
    recorder = RecordingBatchSampler(loader.batch_sampler)
    kwargs = dict(
        dataset=loader.dataset, batch_sampler=recorder, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator, persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    # DPDataLoader's constructor takes a sample rate, not a batch sampler: rebuild it as
    # a plain DataLoader; its Poisson batch sampler is kept inside the recorder.
    rebuilt = DataLoader(**kwargs)
    return IndexTrackingLoader(rebuilt, recorder)
