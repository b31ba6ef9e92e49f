"""A slow link between pipeline stages, for benchmarks: every point-to-point message arrives
`delay_ms` after it was sent (`--link_delay_ms`, one way).

There is no `tc netem` here (the container's kernel has no netem qdisc), so the delay lives in the
point-to-point layer. `install` replaces torch.distributed's `send` and `isend` (in the package and
in distributed_c10d, whose names torch.distributed.pipelining's `P2POp` checks and calls) with
a version that copies the tensor, returns at once, and hands the copy to one sender thread per
(destination, group). That thread waits until `sent_at + delay` and then does the real send
(torch's original isend, waited on). So:

- the sender's compute is never blocked by the delay (a send "completes" as a NIC buffer would);
- a message is never received before `sent_at + delay`; messages to one peer keep their order
  (one FIFO thread per peer and group), so tag-free matching stays correct;
- bandwidth is not modelled (only latency), and receives are untouched.

Every user of point-to-point messages in a run goes through these two functions: DeepSpeed's
pipeline p2p (deepspeed.comm calls torch.distributed.send / isend / batch_isend_irecv by
attribute), the BLL engine's activation isends and feedback tables, and torch's pipelining
schedules. Collectives (all_reduce, broadcast, barrier) are not delayed: a real slow link would
also slow the per-step gradient-norm all-reduce of backprop and BLL's one all-reduce per call,
so this favours neither method by much, and backprop (one all-reduce per step) slightly.
"""

from __future__ import annotations

import queue
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


_ORIGINAL: dict[str, object] = {}
_SENDERS: dict[tuple, "_PeerSender"] = {}
_LOCK = threading.Lock()
_DELAY_S = 0.0


class _DoneWork:
    """What the delayed isend returns: the tensor is copied, so the caller may reuse it now."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self):
        return None


class _PeerSender(threading.Thread):
    def __init__(self, dst: int, group):
        super().__init__(name=f"link-delay-to-{dst}", daemon=True)
        self.dst, self.group = dst, group
        self.inbox: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        # torch's own send is isend + wait through the module's (now replaced) isend: the
        # original isend is the one call that really sends.
        isend = _ORIGINAL["isend"]
        while True:
            item = self.inbox.get()
            if item is None:
                return
            due, tensor, tag = item
            try:
                if self.error is None:  # after a failure the queue is only drained, so flush() returns
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    isend(tensor, self.dst, group=self.group, tag=tag).wait()
            except BaseException as err:  # surfaced on the caller's next send
                self.error = err
            finally:
                self.inbox.task_done()


def _global_dst(dst, group, group_dst) -> int:
    if group_dst is not None:
        return dist.get_global_rank(group, group_dst) if group is not None else group_dst
    return dst


def _enqueue(tensor: torch.Tensor, dst, group, tag, group_dst) -> _DoneWork:
    due = time.perf_counter() + _DELAY_S
    target = _global_dst(dst, group, group_dst)
    # One queue per peer and process group: None and the default group object (what P2POp
    # holds) are the same group, and two queues to one peer could reorder its messages.
    key = (target, id(group if group is not None else c10d._get_default_group()))
    with _LOCK:
        sender = _SENDERS.get(key)
        if sender is None:
            sender = _SENDERS[key] = _PeerSender(target, group)
    if sender.error is not None:
        raise RuntimeError(f"a delayed send to rank {target} failed: {sender.error}") from sender.error
    sender.inbox.put((due, tensor.detach().clone(), tag))
    return _DoneWork()


def _delayed_isend(tensor, dst=None, group=None, tag=0, group_dst=None):
    return _enqueue(tensor, dst, group, tag, group_dst)


def _delayed_send(tensor, dst=None, group=None, tag=0, group_dst=None):
    _enqueue(tensor, dst, group, tag, group_dst)


def install(delay_ms: float) -> None:
    """Delay every point-to-point send of this process by `delay_ms` (0: leave torch as it is)."""
    global _DELAY_S
    if delay_ms < 0:
        raise ValueError(f"link delay must be >= 0 ms, got {delay_ms}")
    if not delay_ms or _ORIGINAL:
        return
    _DELAY_S = delay_ms / 1000.0
    _ORIGINAL.update(send=c10d.send, isend=c10d.isend)
    for module in (c10d, dist):
        module.send, module.isend = _delayed_send, _delayed_isend


def flush() -> None:
    """Wait until every delayed message has been handed to the real send."""
    for sender in list(_SENDERS.values()):
        sender.inbox.join()


def uninstall() -> None:
    """Deliver what is queued, stop the sender threads and give torch its functions back."""
    if not _ORIGINAL:
        return
    flush()
    for sender in _SENDERS.values():
        sender.inbox.put(None)
        sender.join()
    _SENDERS.clear()
    for module in (c10d, dist):
        module.send, module.isend = _ORIGINAL["send"], _ORIGINAL["isend"]
    _ORIGINAL.clear()
