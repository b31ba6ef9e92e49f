"""Sampler: a pure function of (seed, step, micro-batch, dp rank); exact windows; epochs; eval set.

The test stream is arange(n), so a token's value is its position and every row reveals where its
window starts.
"""

import itertools

import numpy as np
import pytest
import torch

from bll_ds.data import EvalBatches, MicroBatchSampler, token_windows_available
from bll_ds.infra.errors import UserError

N, L, B, M = 5_001, 16, 4, 3
STREAM = np.arange(N, dtype=np.uint32)


def _starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_rows_are_stream_windows_and_labels_are_shifted():
    s = MicroBatchSampler(STREAM, L, B, seed=1)
    for step, mb in [(0, 0), (7, 2), (123, 1)]:
        x, y = s.get(step, mb, M)
        assert x.shape == y.shape == (B, L) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):
            start = int(row_x[0])
            assert torch.equal(row_x, torch.arange(start, start + L))
            assert torch.equal(row_y, row_x + 1)
            assert start + L + 1 <= N


def test_pure_function_of_step_and_micro_batch():
    a = MicroBatchSampler(STREAM, L, B, seed=3)
    keys = [(step, mb) for step in (0, 1, 50, 400, 2) for mb in range(M)]
    forward = {k: a.get(*k, M) for k in keys}
    b = MicroBatchSampler(STREAM, L, B, seed=3)  # fresh object, reversed call order
    for k in reversed(keys):
        x, y = b.get(*k, M)
        assert torch.equal(x, forward[k][0]) and torch.equal(y, forward[k][1])
    other_seed = MicroBatchSampler(STREAM, L, B, seed=4)
    assert not torch.equal(other_seed.get(0, 0, M)[0], forward[(0, 0)][0])


def test_iterator_resumes_exactly():
    s = MicroBatchSampler(STREAM, L, B, seed=0)
    full = list(itertools.islice(s.iterator(0, M), 5 * M))
    resumed = list(itertools.islice(MicroBatchSampler(STREAM, L, B, seed=0).iterator(2, M), 3 * M))
    for (x1, y1), (x2, y2) in zip(full[2 * M :], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(full[M + 1][0], s.get(1, 1, M)[0])


@pytest.mark.parametrize("dp_size", [2, 3])
def test_data_parallel_shards_partition_the_global_batch(dp_size):
    for step, mb in [(0, 0), (5, 1), (77, 2)]:
        shards = [MicroBatchSampler(STREAM, L, B, seed=9, dp_rank=r, dp_size=dp_size).get(step, mb, M)[0] for r in range(dp_size)]
        starts = [set(_starts(x)) for x in shards]
        assert all(not (starts[i] & starts[j]) for i in range(dp_size) for j in range(i))
        # one replica with a dp_size-times larger micro-batch reads exactly the union, in rank order
        whole = MicroBatchSampler(STREAM, L, B * dp_size, seed=9).get(step, mb, M)[0]
        assert torch.equal(torch.cat(shards), whole)


def test_epochs_cover_all_windows_and_move_boundaries():
    s = MicroBatchSampler(STREAM, L, B, seed=5)
    per_epoch = s.windows_per_epoch
    assert per_epoch == token_windows_available(N, L) - 1
    steps_per_epoch = per_epoch // (M * B)
    seen = [x for step in range(steps_per_epoch) for mb in range(M) for x in _starts(s.get(step, mb, M)[0])]
    assert len(seen) == len(set(seen))  # no window twice within an epoch
    assert all(start % L == 0 for start in seen)  # epoch 0: shift 0, windows tile the stream
    assert {s.epoch_layout(0)[0]} == {0}
    shifts = {s.epoch_layout(e)[0] for e in range(1, 8)}
    assert shifts - {0} and all(0 <= sh < L for sh in shifts)  # later epochs cut the stream elsewhere
    epoch1 = s.window_starts(np.arange(per_epoch, 2 * per_epoch))
    assert len(set(epoch1.tolist())) == per_epoch and len({int(v) % L for v in epoch1}) == 1


@pytest.mark.parametrize("n", [L + 1, L + 5, 2 * L, 2 * L + 1, 3 * L + 7])
def test_short_streams_stay_in_bounds(n):
    s = MicroBatchSampler(np.arange(n, dtype=np.uint16), L, 2, seed=11)
    for step in range(40):
        x, y = s.get(step, 0, 1)
        assert int(y.max()) <= n - 1 and torch.equal(y, x + 1)


def test_too_short_stream_is_user_error():
    with pytest.raises(UserError) as e:
        MicroBatchSampler(np.arange(L, dtype=np.uint16), L, B, seed=0, name="train")
    msg = str(e.value)
    assert f"{L} tokens" in msg and f"seq_len + 1 = {L + 1}" in msg and "smaller seq_len" in msg


def test_eval_batches_fixed_spread_and_non_overlapping():
    ev = EvalBatches(STREAM, L, B, max_batches=5)
    assert len(ev) == 5
    first, second = list(ev), list(ev)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    starts = [s for x, y in first for s in _starts(x)]
    assert starts == sorted(starts) and all(b - a >= L for a, b in zip(starts, starts[1:]))  # labels disjoint
    assert starts[-1] > N // 2  # spread over the whole stream, not just its head
    for x, y in first:
        assert torch.equal(y, x + 1)


def test_eval_batches_small_stream_uses_full_batches_only():
    n = 10 * L + 1  # 10 windows -> 2 full batches of 4, the partial one dropped
    ev = EvalBatches(np.arange(n, dtype=np.uint16), L, 4, max_batches=100)
    assert len(ev) == 2 and [_starts(x) for x, _ in ev] == [[0, L, 2 * L, 3 * L], [4 * L, 5 * L, 6 * L, 7 * L]]
    with pytest.raises(UserError, match="fewer than one micro-batch of 4"):
        EvalBatches(np.arange(3 * L + 1, dtype=np.uint16), L, 4, max_batches=1)
