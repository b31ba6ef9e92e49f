"""DeepSpeed's PipelineEngine (1F1B backprop) with per-stage p2p accounting.

DeepSpeed dispatches schedule instructions through the class attribute `_INSTRUCTION_MAP`, so
overriding a method alone changes nothing: the subclass installs its own map whose p2p entries
wrap the stock methods with timing and counting. The schedule and every numeric path are
DeepSpeed's own; this is the backprop baseline that every block-local claim is measured against.

Both engines (this one and the block-local one) expose the same training entry,
`train_steps(first_step, num_steps, batch_fn) -> {stage: [StepRecord]}` (this rank's stage; the
one-process emulator returns every stage's), so train.py has one loop.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from bll_ds.pipeline import nonfinite
from bll_ds.pipeline.accounting import StageAccounting, tensor_bytes
from bll_ds.pipeline.launched import deepspeed_internals as ds_internals
from bll_ds.pipeline.step_record import StepRecord, snapshot, step_seed, update_norm
from bll_ds.pipeline.trace import StageTracer, traced


def _as_float(value) -> float | None:
    """DeepSpeed reports norms as floats or 0-d tensors depending on the optimizer wrapper."""
    return None if value is None else float(value)


def _send_activations(self, buffer_id):
    with self.accounting.p2p():
        ds_internals.send_activations(self, buffer_id)
    self.accounting.count("acts_sent", tensor_bytes(ds_internals.pipe_buffers(self)["outputs"][buffer_id]),
                          "bytes_down")


def _recv_activations(self, buffer_id):
    with self.accounting.p2p():
        ds_internals.recv_activations(self, buffer_id)
    self.accounting.count("acts_received")


def _send_grads(self, buffer_id):
    # The stock method frees the input buffer whose .grad it sends: measure first.
    inputs = ds_internals.pipe_buffers(self)["inputs"][buffer_id]
    grads = inputs.grad if torch.is_tensor(inputs) else [t.grad for t in inputs if t.is_floating_point()]
    n_bytes = tensor_bytes(grads)
    with self.accounting.p2p():
        ds_internals.send_grads(self, buffer_id)
    self.accounting.count("grads_sent", n_bytes, "bytes_up")


def _recv_grads(self, buffer_id):
    with self.accounting.p2p():
        ds_internals.recv_grads(self, buffer_id)
    self.accounting.count("grads_received")


def guarded_reduce_grads(self):
    """A non-finite step is decided here, before the all-reduce, while every rank still holds
    its own gradients; its gradients are then dropped, not reduced."""
    grads = [p.grad for p in self.module.parameters()]
    self.nonfinite = nonfinite.agreed_cause(self, nonfinite.local_cause(self.step_losses(), grads))
    if self.nonfinite:
        nonfinite.clear_gradients(self)
        return
    ds_internals.reduce_grads(self)


def guarded_optimizer_step(self, lr_kwargs=None):
    """DeepSpeed's optimizer step, or the skip that ReduceGrads decided on."""
    if self.nonfinite:
        nonfinite.skip_update(self, lr_kwargs)
        return
    ds_internals.optimizer_step(self, lr_kwargs)
    self.nonfinite = nonfinite.after_optimizer_step(self, lr_kwargs)


class AccountedPipelineEngine(PipelineEngine):
    _INSTRUCTION_MAP = traced({
        **ds_internals.stock_instruction_map(),
        schedule.SendActivation: _send_activations,
        schedule.RecvActivation: _recv_activations,
        schedule.SendGrad: _send_grads,
        schedule.RecvGrad: _recv_grads,
        schedule.ReduceGrads: guarded_reduce_grads,
        schedule.OptimizerStep: guarded_optimizer_step,
    })

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.accounting = StageAccounting(self.stage_id, self.grid.data_parallel_id, self.device)
        self.tracer = StageTracer(self.stage_id, range(0), self.device)  # train.py sets the traced window
        self.nonfinite = None  # this step's cause, set at its gradient all-reduce
        self.fault = nonfinite.FaultInjection(self.stage_id, self.grid.data_parallel_id)
        if self.is_last_stage():
            self.module.loss_fn = self.fault.wrap(self.module.loss_fn, self.training_step, lambda: self.module.training)

    def training_step(self) -> int:
        """1-based index of the optimizer step being computed."""
        return self.global_steps + 1

    def step_losses(self) -> list[torch.Tensor]:
        """This stage's losses of the current step, before its optimizer step (backprop: the
        last stage's; the others see a non-finite loss through their gradients)."""
        loss = ds_internals.last_stage_loss(self)
        return [loss] if self.is_last_stage() and torch.is_tensor(loss) else []

    def weights(self) -> list[torch.Tensor]:
        """Every tensor this stage keeps between steps (not activations)."""
        return [*self.module.parameters(), *self.module.buffers()]

    @property
    def local_stages(self) -> list[int]:
        """The stages this process trains (one; the emulator trains all)."""
        return [self.stage_id]

    def stage_views(self) -> list:
        """Per local stage: what summary.json reads (accounting, module, tracer, skipped_steps)."""
        return [self]

    def train_steps(self, first_step: int, num_steps: int, batch_fn, track_update_at=(), on_step=None) -> dict[int, list]:
        """Steps first_step+1 .. first_step+num_steps, one DeepSpeed train_batch (1F1B, flushed) each;
        on_step(record) as each ends."""
        records = []
        for step in range(first_step + 1, first_step + num_steps + 1):
            torch.manual_seed(step_seed(self.seed, step, self.global_rank))
            batches = iter([batch_fn(step - 1, m, self.micro_batches) for m in range(self.micro_batches)])
            before = snapshot(ds_internals.master_weights(self)) if step in track_update_at else None
            self.tracer.set_step(step, self.weights)
            start = self.accounting.now()
            loss = self.train_batch(batches).item()
            step_s = self.accounting.now() - start
            busy, idle = self.accounting.end_step(step_s)
            records.append(StepRecord(step=step, loss=loss, step_s=step_s, busy_s=busy, idle_s=idle,
                                      lr=self.get_lr()[0],
                                      grad_norm=None if self.nonfinite else _as_float(self.get_global_grad_norm()),
                                      update_norm=None if before is None else
                                      update_norm(before, ds_internals.master_weights(self)),
                                      nonfinite=self.nonfinite))
            if on_step is not None:
                on_step(records[-1])
        self.tracer.set_step(None)
        return {self.stage_id: records}

    def start_feedback(self, resumed_step: int) -> None:
        """Backprop has no feedback network."""

    def drain(self, completed_step: int) -> None:
        """1F1B flushes inside every train_batch: nothing is ever in flight between calls."""

    def extra_state(self) -> dict | None:
        return None

    def load_extra_state(self, state) -> None:
        pass
