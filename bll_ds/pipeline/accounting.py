"""Per-stage accounting of pipeline traffic and time.

`idle_s` is wall time spent inside the pipeline's p2p instructions (send/recv of activations
and gradients, including the shape handshake): time a stage is blocked on its neighbours.
`busy_s` is the rest of the training-step wall time. Only training steps are counted; evaluation
is excluded with `paused()`. On CUDA both are device time (bll_ds/pipeline/device_timer.py): `now()`
synchronizes, and p2p waits are CUDA-event intervals on the compute stream.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from bll_ds.measure.rss import peak_rss_mb
from bll_ds.pipeline.device_timer import timer_for


@dataclass
class StageCounters:
    stage: int
    dp_rank: int
    busy_s: float = 0.0
    idle_s: float = 0.0
    acts_sent: int = 0
    acts_received: int = 0
    grads_sent: int = 0
    grads_received: int = 0
    tables_sent: int = 0       # feedback tables sent upstream (block-local learning)
    tables_received: int = 0
    bytes_down: int = 0  # bytes this stage sent to the next stage (activations)
    bytes_up: int = 0    # bytes this stage sent to the previous stage (gradients; BLL: feedback tables)


def tensor_bytes(obj) -> int:
    if obj is None:
        return 0
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    return sum(tensor_bytes(t) for t in obj)


class StageAccounting:
    def __init__(self, stage: int, dp_rank: int, device=None):
        self.counters = StageCounters(stage=stage, dp_rank=dp_rank)
        self.timer = timer_for(device)
        self.device = device
        self._enabled = True
        self._waits: list[tuple[object, object]] = []  # (start, end) marks of this step's p2p calls

    def now(self) -> float:
        """The clock for step wall times: on CUDA, after the queued work has finished."""
        return self.timer.now()

    @contextlib.contextmanager
    def paused(self):
        self._enabled, previous = False, self._enabled
        try:
            yield
        finally:
            self._enabled = previous

    @contextlib.contextmanager
    def p2p(self):
        start = self.timer.mark()
        try:
            yield
        finally:
            if self._enabled:
                self._waits.append((start, self.timer.mark()))

    def count(self, field: str, n_bytes: int = 0, bytes_field: str | None = None) -> None:
        if not self._enabled:
            return
        setattr(self.counters, field, getattr(self.counters, field) + 1)
        if bytes_field:
            setattr(self.counters, bytes_field, getattr(self.counters, bytes_field) + n_bytes)

    def end_step(self, step_wall_s: float) -> tuple[float, float]:
        """Close one training step; returns its (busy_s, idle_s)."""
        idle = sum(self.timer.interval_s(a, b) for a, b in self._waits)
        self._waits = []
        busy = max(step_wall_s - idle, 0.0)
        self.counters.busy_s += busy
        self.counters.idle_s += idle
        return busy, idle

    def summary(self) -> dict:
        out = asdict(self.counters)
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if self.device is not None and torch.device(self.device).type == "cuda":
            # This stage's process (one stage per GPU when launched; the emulator reports its one
            # device on every stage).
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        total = out["busy_s"] + out["idle_s"]
        out["utilisation"] = round(out["busy_s"] / total, 4) if total > 0 else None
        return out
