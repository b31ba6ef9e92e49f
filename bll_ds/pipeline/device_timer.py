"""Clocks for a stage's accounting and tracer that measure the device's work, not its queue.

On a CPU an operation is done when its Python call returns, so the host clock is the truth. On
a CUDA device a call returns once its kernels are queued: a host clock around a forward pass
measures the launch, and around an NCCL receive it measures nothing at all. So on CUDA:

- step boundaries and traced instructions synchronize the device before reading the clock (a
  step's wall time is the time its kernels took; tracing covers a few warm-up steps only);
- the time a stage waits in point-to-point calls is measured with CUDA events recorded on the
  compute stream before and after the call: their interval is how long the stream stood still
  for the transfer, read once per step (one synchronization per step, not per call).
"""

from __future__ import annotations

import time

import torch


class HostTimer:
    """CPU devices (and anything not CUDA): the host's monotonic clock."""

    def now(self) -> float:
        return time.monotonic()

    def mark(self) -> float:
        return time.monotonic()

    def interval_s(self, start, end) -> float:
        return end - start


class CudaTimer:
    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        torch.cuda.synchronize(self.device)
        return time.monotonic()

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def interval_s(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def timer_for(device) -> HostTimer | CudaTimer:
    device = torch.device(device) if device is not None else torch.device("cpu")
    return CudaTimer(device) if device.type == "cuda" else HostTimer()
