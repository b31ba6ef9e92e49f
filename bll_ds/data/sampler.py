"""Deterministic micro-batches from a flat token stream.

Why a pure function of (seed, step, micro-batch, dp rank) instead of a DataLoader with state: in a
pipeline every stage needs the same batch (the first stage its inputs, the last its labels, and
block-local learning gives every stage a local loss that needs the labels too), and a resumed run
must continue with exactly the batches the uninterrupted run would have seen. With no iterator
state to save, sync or replay, both hold by construction: each stage calls `get` for the same
(step, micro_batch) and gets identical tensors; resuming at step k just calls `get(k, ...)`.

Windows: a window is seq_len + 1 tokens (inputs = first seq_len, labels = inputs shifted by one).
Windows start every seq_len tokens from an epoch-specific offset, so their input spans tile the
stream without overlap and every token is predicted once per epoch. Epoch e visits its windows in
a random order drawn from (seed, e) and starts them at offset shift_e in [0, max_shift] (also from
(seed, e); epoch 0 uses 0), so later epochs see different window boundaries instead of repeating
the exact same contexts. To keep the epoch length fixed whatever the shift, an epoch has
`token_windows_available(n, seq_len) - 1` windows (the last, partial one is dropped), or exactly one
window with a smaller shift range when the stream only holds one.

Global sample index of row r of micro-batch m at step s for data-parallel rank d of D, with M
micro-batches per step and micro-batch size B:  ((s * M + m) * D + d) * B + r. Replicas therefore
read disjoint, interleaved slices of one global batch, and the global batch for a step is the same
set of windows for any D with equal D * B.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from bll_ds.data.packing import token_windows_available
from bll_ds.infra.errors import UserError


class MicroBatchSampler:
    """Training micro-batches; see the module docstring for the sampling scheme."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, seed: int,
                 dp_rank: int = 0, dp_size: int = 1, name: str = "train"):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        n = len(tokens)
        available = token_windows_available(n, seq_len)
        if available == 0:
            raise UserError(
                f"the {name} split has {n} tokens, fewer than one window of seq_len + 1 = {seq_len + 1} tokens.",
                "use more data or a smaller seq_len.",
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = int(seed) % (1 << 64)  # SeedSequence takes non-negative integers
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.windows_per_epoch = max(1, available - 1)
        self.max_shift = min(seq_len - 1, n - 1 - self.windows_per_epoch * seq_len)
        self._layouts: dict[int, tuple[int, np.ndarray]] = {}  # derived state only: epoch -> (shift, order)

    def epoch_layout(self, epoch: int) -> tuple[int, np.ndarray]:
        """(start offset, window visiting order) of `epoch`, a function of (seed, epoch) only."""
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch])
            shift = int(rng.integers(0, self.max_shift + 1))
            order = rng.permutation(self.windows_per_epoch)
            if len(self._layouts) >= 2:  # a micro-batch spans at most two epochs
                self._layouts.pop(min(self._layouts))
            self._layouts[epoch] = (0 if epoch == 0 else shift, order)
        return self._layouts[epoch]

    def global_indices(self, step: int, micro_batch: int, micro_batches_per_step: int) -> np.ndarray:
        if step < 0 or not 0 <= micro_batch < micro_batches_per_step:
            raise ValueError(f"need step >= 0 and 0 <= micro_batch < {micro_batches_per_step}, got {step}, {micro_batch}")
        first = ((step * micro_batches_per_step + micro_batch) * self.dp_size + self.dp_rank) * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def window_starts(self, global_indices: np.ndarray) -> np.ndarray:
        """Stream offset of the window for each global sample index."""
        starts = np.empty(len(global_indices), dtype=np.int64)
        for i, g in enumerate(global_indices):
            epoch, k = divmod(int(g), self.windows_per_epoch)
            shift, order = self.epoch_layout(epoch)
            starts[i] = shift + int(order[k]) * self.seq_len
        return starts

    def get(self, step: int, micro_batch: int, micro_batches_per_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both int64 [micro_batch_size, seq_len], for this (step, micro-batch)."""
        starts = self.window_starts(self.global_indices(step, micro_batch, micro_batches_per_step))
        return _windows_to_batch(self.tokens, starts, self.seq_len)

    def iterator(self, start_step: int, micro_batches_per_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless micro-batches from (start_step, 0) on, in order: what DeepSpeed's PipelineEngine pulls."""
        step = start_step
        while True:
            for mb in range(micro_batches_per_step):
                yield self.get(step, mb, micro_batches_per_step)
            step += 1


class EvalBatches:
    """A fixed validation set: the same windows every evaluation, so val losses are comparable
    across steps and runs. Windows start at multiples of seq_len from the stream start (their label
    spans do not overlap); with more windows than max_batches * micro_batch_size they are spread
    evenly over the whole stream rather than taken from its beginning, so the estimate covers all of
    val. Only full micro-batches are made (pipeline engines need fixed shapes)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, max_batches: int, name: str = "val"):
        if seq_len < 1 or micro_batch_size < 1 or max_batches < 1:
            raise ValueError(f"seq_len, micro_batch_size, max_batches must be >= 1, got {seq_len}, {micro_batch_size}, {max_batches}")
        available = token_windows_available(len(tokens), seq_len)
        if available < micro_batch_size:
            raise UserError(
                f"the {name} split has {len(tokens)} tokens: {available} windows of seq_len + 1 = {seq_len + 1} tokens, "
                f"fewer than one micro-batch of {micro_batch_size}.",
                "use more validation data, a smaller seq_len, or a smaller micro-batch size.",
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        wanted = max_batches * micro_batch_size
        if available <= wanted:
            windows = np.arange((available // micro_batch_size) * micro_batch_size, dtype=np.int64)
        else:
            windows = (np.arange(wanted, dtype=np.int64) * available) // wanted
        self.starts = windows * seq_len

    def __len__(self) -> int:
        return len(self.starts) // self.micro_batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.micro_batch_size
        for i in range(len(self)):
            yield _windows_to_batch(self.tokens, self.starts[i * b : (i + 1) * b], self.seq_len)


def _windows_to_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts]).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
