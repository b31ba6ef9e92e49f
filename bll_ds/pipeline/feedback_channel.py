"""Target tables travelling upstream (stage k+1 -> stage k; from the last stage to every stage for
direct feedback, bll_ds/method/direct.py), once per optimizer step.

The rule that makes training deterministic (and resume exact) without ever making a stage wait
for another stage's current step:

    stage k+1 publishes P_j after its optimizer step j (P_0 at start-up);
    stage k uses P_{max(t - LAG, 0)} during its step t, with LAG = 2.

With refresh=k (a variant option, bll_ds/method/variant_options.py) stage k+1 publishes only after
steps j = 0, k, 2k, ... and stage k uses P_j with j = k * floor(max(t - LAG, 0) / k): the same
rule with the step rounded down to the refresh grid (`table_index`), so k = 1 is the rule above.

Stage k+1 runs behind stage k by about one micro-batch (it needs stage k's activations), so when
stage k starts step t, P_{t-2} was sent about a whole step earlier: the receive finds it waiting.
LAG = 1 would make stage k wait for stage k+1 to finish the step it is still working on.

Sends are non-blocking (gloo's blocking send waits for the matching receive). At sync points
(evaluation, checkpoint, end of a train call) the receiver drains every table in flight into its
queue, which is saved in its checkpoint, so a resumed run consumes exactly the same tables.

Tables travel on a process group of their own for each pair of sending and receiving stages
(`message_groups`), never on the default group with a tag: NCCL ignores tags, and on the
default group an upstream table would queue on the same communicator and stream as the
downstream activations of that pair, where a send waiting for its receive blocks the activation
behind it (a deadlock on the first GPU run). A group per pair is a communicator and stream per
pair, on every backend.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as tdist

LAG = 2


def message_groups(sources: dict[int, int], replicas: int, global_rank) -> dict[tuple[int, int], object]:
    """{(stage k, replica d): the two-rank group of stage k and the stage it receives from,
    sources[k] (k+1; the last stage for direct feedback), of replica d}.

    Every rank must create every group, in the same order (torch.distributed.new_group's rule),
    even the groups it is not part of. global_rank(stage, replica) -> rank in the world."""
    return {(k, d): tdist.new_group(sorted({global_rank(k, d), global_rank(source, d)}))
            for d in range(replicas) for k, source in sorted(sources.items())}


def publishes_after(step: int, refresh: int = 1) -> bool:
    """Whether a stage sends its table after optimizer step `step` (0: the initial table)."""
    return step % refresh == 0


def table_index(step: int, refresh: int = 1) -> int:
    """j of the table P_j that a stage uses during its (1-based) step `step`."""
    return max(step - LAG, 0) // refresh * refresh


def tables_published(completed_step: int, refresh: int = 1) -> int:
    """Tables a stage has sent once it has finished step `completed_step` (P_0 included)."""
    return completed_step // refresh + 1


# Payloads an outbox holds at most between publishes: the one just sent, and its predecessor
# until its send is seen complete (publish drops completed ones). The memory planner counts these.
OUTBOX_HELD = 2


class TableOutbox:
    """On a sending stage: sends its table to one receiving stage (k-1) of the same data-parallel
    replica."""

    def __init__(self, dst_rank: int, group=None):
        """group: the two-rank group of this stage and the receiving one (message_groups)."""
        self.dst_rank, self.group = dst_rank, group
        self.published = 0  # tables sent so far (P_0 .. P_{published-1})
        self._pending: list[tuple[object, torch.Tensor]] = []

    def publish(self, table: torch.Tensor) -> None:
        payload = table.detach().contiguous().clone()
        self._pending.append((tdist.isend(payload, self.dst_rank, group=self.group), payload))
        self.published += 1
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def flush(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []


class TableInbox:
    """On stage k < S-1: receives its source's tables (stage k+1's, or the last stage's), in order,
    and hands out the one for a step."""

    def __init__(self, src_rank: int, shape: tuple[int, ...], dtype: torch.dtype, device, refresh: int = 1,
                 group=None):
        """group: the two-rank group of this stage and its source (message_groups)."""
        self.src_rank, self.shape, self.dtype, self.device = src_rank, shape, dtype, device
        self.group = group
        self.refresh = refresh
        self.received = 0                    # tables received so far
        self.queue: deque[tuple[int, torch.Tensor]] = deque()  # (j, P_j), oldest first

    def _receive_one(self) -> None:
        table = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        tdist.recv(table, self.src_rank, group=self.group)
        self.queue.append((self.received * self.refresh, table))  # the n-th table is P_{n k}
        self.received += 1

    def table_for_step(self, step: int) -> torch.Tensor:
        """step is 1-based: the table used while computing step `step`."""
        wanted = table_index(step, self.refresh)
        while self.received * self.refresh <= wanted:
            self._receive_one()
        while self.queue and self.queue[0][0] < wanted:
            self.queue.popleft()
        return self.queue[0][1]

    def drain(self, published: int) -> None:
        while self.received < published:
            self._receive_one()

    def state_dict(self) -> dict:
        return {"received": self.received, "queue": [(j, t.cpu()) for j, t in self.queue]}

    def load_state_dict(self, state: dict) -> None:
        self.received = state["received"]
        self.queue = deque((j, t.to(device=self.device, dtype=self.dtype)) for j, t in state["queue"])
