"""One block-local stage's whole optimizer step, for every driver of it: the launched engine
(pipeline/launched/bll_engine.py), the one-process emulator (pipeline/emulated/emulator.py) and the scale rehearsal
(bll_bench/rehearse.py). What the method computes is method/stage_step.py's; this is the order it
runs in and what it records. Beside docs/METHOD.md:

    start(resumed)        fresh run: take the downstream stage's P_0 and publish this stage's own
                          P_0 upstream (a one-time chain, last stage first); resumed: the transport
                          restores its counts from the step
    begin(t)              the driver seeds step t (step_record.step_seed) and starts its clocks;
                          the message for step t arrives by the lag rule (feedback_channel.py);
                          StageStep.begin (m_k = g_k(P) once, no graph)
    local_backward(h, y)  per micro-batch, after the driver's forward: the local loss and its
                          backward inside the stage (StageStep.local_backward); the driver also
                          hands over the stage's input, for a critic of it (method/critic.py)
    step end, in STEP_END order (the launched engine runs each as an instruction of its schedule,
    the emulator and the rehearsal through run_step_end(stage.step_end(t))):
        finish_feedback   the feedback network's update: one backward through g_k
        reduce_grads      the step's non-finite verdict, then the all-reduce over the replicas
        optimizer_step    clip by this stage's own norm and step, or skip a non-finite step; on
                          tracked steps the update norm over the optimizer's (fp32 master) weights
        publish_table     the message upstream, after the steps the refresh period picks
    record(...)           the step's StepRecord

A driver supplies its compute (StageCompute) and its message transport (MessageTransport) and
keeps only what is its own: the launched engine DeepSpeed's instructions and the activation
send/receive, the emulator its stages' RNG streams and clocks. Nothing here waits for another
stage or sends a gradient anywhere.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from bll_ds.method.stage_step import STEP_END, StageStep
from bll_ds.pipeline.feedback_channel import publishes_after
from bll_ds.pipeline.step_record import StepRecord, snapshot, update_norm


class StageCompute(Protocol):
    """A stage's numerics, as its driver runs them."""

    def begin_step(self, step: int) -> None:
        """Seed step `step`'s RNG (step_record.step_seed) and start what the driver times."""

    def backward(self, loss: torch.Tensor, scale_by_micro_batches: bool) -> None:
        """Back-propagate inside the stage; divide by the micro-batches when asked."""

    def reduce_grads(self, losses: list[torch.Tensor]) -> str | None:
        """The step's non-finite verdict (pipeline/nonfinite.py; None: finite), agreed by the stage's
        replicas, then the gradient all-reduce unless the step is dropped."""

    def optimizer_step(self, cause: str | None, tracked: bool) -> tuple[str | None, float | None]:
        """Clip and step, or skip when `cause`. Returns the verdict after the step (an optimizer
        may find a non-finite update itself) and the gradient norm before clipping (None where
        skipped; `tracked`: a step whose norms are logged, worth an extra measurement)."""

    def master_weights(self) -> list[torch.Tensor]:
        """The weights the optimizer updates, in fp32 (bf16 runs: the masters)."""

    def lr(self) -> float:
        """The learning rate the last optimizer step used."""


class MessageTransport(Protocol):
    """How the downstream stage's messages reach this stage and its own leave upstream."""

    receives: bool  # a downstream stage sends this stage messages
    sends: bool     # this stage sends its messages upstream

    def table_for_step(self, step: int) -> torch.Tensor | None:
        """The message stage k uses during step `step`, by the lag rule (feedback_channel.py)."""

    def publish(self, table: torch.Tensor, completed_step: int) -> None:
        """Send (a copy of) this stage's message after step `completed_step` upstream, and count it."""

    def resume(self, completed_step: int) -> None:
        """A resumed run: restore what follows from the step (the count of messages sent)."""


class BlockLocalStage:
    """One stage's step, driven through `compute` and `transport` (module docstring)."""

    def __init__(self, stage_step: StageStep, layers: Sequence[nn.Module], last: bool, refresh: int,
                 compute: StageCompute, transport: MessageTransport):
        """`stage_step`: the stage's StageStep (its feedback block, LM loss and variant); `layers`: its
        forward layers (the last stage's LM head, and the layers a variant may send, are read
        from them); `refresh`: steps between messages (the variant's table_refresh)."""
        self.stage_step, self.layers, self.last, self.refresh = stage_step, layers, last, refresh
        self.compute, self.transport = compute, transport
        self.track_update_at: set[int] = set()
        self.current = 0                  # the optimizer step being computed (1-based)
        self.cause: str | None = None     # this step's non-finite verdict
        self.grad_norm = self.update_norm = None

    def start(self, resumed_step: int) -> None:
        if resumed_step > 0:
            self.transport.resume(resumed_step)
            return
        if self.transport.receives:
            self.stage_step.begin(self.transport.table_for_step(1))
        self.publish_table(0)

    def begin(self, step: int) -> None:
        self.current, self.cause, self.grad_norm, self.update_norm = step, None, None, None
        self.compute.begin_step(step)
        self.stage_step.begin(self.transport.table_for_step(step) if self.transport.receives else None)

    def local_backward(self, outputs: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs`: what the stage received, for a variant that trains a critic of it (critic.py)."""
        return self.stage_step.local_backward(outputs, labels, self.compute.backward, inputs, self.layers)

    # ---- the step end, one method per STEP_END name ----------------------------------------------
    def finish_feedback(self) -> None:
        self.stage_step.finish_feedback(self.compute.backward)

    def reduce_grads(self) -> None:
        self.cause = self.compute.reduce_grads(self.stage_step.losses)

    def optimizer_step(self) -> None:
        tracked = self.cause is None and self.current in self.track_update_at
        before = snapshot(self.compute.master_weights()) if tracked else None
        self.cause, self.grad_norm = self.compute.optimizer_step(self.cause, tracked)
        self.update_norm = update_norm(before, self.compute.master_weights()) if tracked else None

    def publish_table(self, completed_step: int | None = None) -> None:
        """After step `completed_step` (default: the current one); 0: the initial table."""
        completed = self.current if completed_step is None else completed_step
        if not self.transport.sends or not publishes_after(completed, self.refresh):
            return
        head = self.layers[-1].lm_head.weight if self.last else None
        self.transport.publish(self.stage_step.table_to_publish(head, self.layers), completed)

    def step_end(self) -> dict[str, Callable[[], None]]:
        """The step-end operations by STEP_END name, for run_step_end."""
        return {name: getattr(self, name) for name in STEP_END}

    def record(self, step_s: float, busy_s: float, idle_s: float) -> StepRecord:
        return StepRecord(step=self.current, loss=self.stage_step.mean_loss(), step_s=step_s, busy_s=busy_s, idle_s=idle_s,
                          lr=self.compute.lr(), grad_norm=None if self.cause else self.grad_norm,
                          update_norm=self.update_norm, nonfinite=self.cause, terms=self.stage_step.mean_terms())
