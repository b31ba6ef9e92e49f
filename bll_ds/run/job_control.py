"""Stopping a run cleanly under a scheduler: SIGTERM, SIGUSR1 and a wall-time budget.

SLURM sends SIGTERM at the time limit (and, with `--signal=USR1@SECONDS`, SIGUSR1 that long
before); the deepspeed launcher passes SIGTERM on to every rank and kills them 30 s later;
torchrun does the same. A handler only notes the request: the run stops at the next engine-call
boundary, where the pipe is drained and a checkpoint is consistent, saves one and exits 0, and
`--resume auto` continues it in the next job.

Ranks must agree on the step they stop at, or one rank would wait forever in the checkpoint's
barrier for a rank that trained on. So the decision is a MAX all-reduce over the world at call
boundaries only (never inside a block-local call: a collective per step would couple the
stages that block-local learning keeps apart). A call is at most --bll_steps_per_call steps
(backprop: one step); give the signal that much lead.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as tdist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_NONE, _DURATION, _SIGNAL = 0, 1, 2  # MAX-reduced: a signal anywhere outranks a timer


class JobControl:
    def __init__(self, exit_duration_mins: float, started: float):
        self.deadline = started + exit_duration_mins * 60 if exit_duration_mins > 0 else None
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def _local_request(self) -> int:
        if self.signal_name is not None:
            return _SIGNAL
        return _DURATION if self.deadline is not None and time.time() >= self.deadline else _NONE

    def stop_reason(self, device) -> str | None:
        """Why every rank stops now, or None. A collective: every rank calls it at the same steps."""
        request = self._local_request()
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            flag = torch.tensor([request], dtype=torch.int64, device=device)
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            request = int(flag.item())
        if request == _SIGNAL:
            return f"a stop signal ({self.signal_name or 'on another rank'})"
        if request == _DURATION:
            return "--exit_duration_mins was reached"
        return None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
