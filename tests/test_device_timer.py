"""Stage accounting and tracing measure device work, not host time. On CPU the host clock
is the truth; on CUDA step boundaries synchronize and p2p waits are CUDA-event intervals, read
once per step. CUDA itself is not on the CI machine, so the CUDA timer's contract is checked with
a stand-in that behaves as CUDA events do: marks are recorded when the call returns, and their
interval is known only when the step ends."""

import time

import torch

from bll_ds.pipeline.accounting import StageAccounting
from bll_ds.pipeline.device_timer import CudaTimer, HostTimer, timer_for
from bll_ds.pipeline.trace import StageTracer


class DeferredTimer:
    """Like CudaTimer: `now()` synchronizes (counted), marks resolve only in interval_s."""

    def __init__(self):
        self.clock, self.syncs, self.resolved = 0.0, 0, 0

    def now(self):
        self.syncs += 1
        return self.clock

    def mark(self):
        return {"at": self.clock}

    def interval_s(self, start, end):
        self.resolved += 1
        return end["at"] - start["at"]


def test_the_timer_follows_the_device():
    assert isinstance(timer_for(torch.device("cuda", 1)), CudaTimer)   # built without touching CUDA
    assert timer_for(torch.device("cuda", 1)).device == torch.device("cuda", 1)
    assert isinstance(timer_for("cpu"), HostTimer) and isinstance(timer_for(None), HostTimer)


def test_host_timer_counts_real_waits():
    accounting = StageAccounting(0, 0, torch.device("cpu"))
    start = accounting.now()
    with accounting.p2p():
        time.sleep(0.05)
    busy, idle = accounting.end_step(accounting.now() - start)
    assert idle >= 0.05 and busy >= 0.0
    assert "peak_cuda_mb" not in accounting.summary()  # a CPU stage has no CUDA peak


def test_waits_are_resolved_at_the_step_end_not_per_call():
    accounting = StageAccounting(0, 0)
    accounting.timer = timer = DeferredTimer()
    for wait in (0.25, 0.5):
        with accounting.p2p():
            timer.clock += wait          # the stream stood still this long in the transfer
        timer.clock += 1.0               # compute
    with accounting.paused(), accounting.p2p():  # evaluation traffic is not training idle time
        timer.clock += 7.0
    assert timer.resolved == 0           # no synchronization inside the step
    busy, idle = accounting.end_step(step_wall_s=2.75)
    assert (busy, idle) == (2.0, 0.75) and timer.resolved == 2


def test_tracer_reads_the_synchronizing_clock():
    tracer = StageTracer(0, range(2, 3))
    tracer.timer = timer = DeferredTimer()
    tracer.set_step(2)

    def work():
        timer.clock += 3.0
    tracer.run("ForwardPass", work)
    tracer.set_step(1)
    tracer.run("ForwardPass", work)      # untraced step: no clock read
    assert tracer.events == [("ForwardPass", 2, 0.0, 3.0)] and timer.syncs == 2
