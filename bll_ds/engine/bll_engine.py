"""The block-local learning engine: DeepSpeed's PipelineEngine with its own schedule.

Per micro-batch each stage receives activations (blocking: it needs them), runs its forward
pass, sends the *detached* output downstream without waiting for the receiver (isend, bounded
window), computes its local loss against targets it loaded itself, and back-propagates inside the
stage. At the step boundary it clips, steps and publishes its feedback table. Nothing crosses
stages but activations (down) and target tables (up); gradients never do.

Stage-local optimisation. DeepSpeed's gradient-norm code reduces over the "model-parallel group",
which for a pipeline spans every stage. The engine therefore gets a grid whose model-parallel
group is this rank alone: clipping (and fp16 overflow checks) become per stage, while the
data-parallel group (ZeRO-1 sharding, gradient all-reduce across a stage's replicas) is untouched.
"""

from __future__ import annotations


import torch
import torch.distributed as tdist

from bll_ds.bll.stage_step import StageStep
from bll_ds.engine import bll_schedule as bll
from bll_ds.engine import deepspeed_internals as ds_internals
from bll_ds.engine.accounting import tensor_bytes
from bll_ds.bll.variants import get as get_variant
from bll_ds.engine.feedback_channel import (TableInbox, TableOutbox, neighbour_groups, publishes_after,
                                            tables_published)
from bll_ds.engine.pipeline_engine import AccountedPipelineEngine, StepRecord, _as_float, guarded_optimizer_step
from bll_ds.engine.trace import traced


# Detached outputs whose sends may be in flight, per micro-batch of a step: a slow receiver can
# hold two steps' sends (the memory planner counts this worst case).
SEND_WINDOW_PER_MICRO_BATCH = 2

class StageLocalGrid:
    """DeepSpeed's PipelineParallelGrid, except that the model-parallel group is this rank alone."""

    def __init__(self, grid, own_group):
        self._grid = grid
        self._own_group = own_group

    def get_model_parallel_group(self):
        return self._own_group

    def __getattr__(self, name):
        return getattr(self._grid, name)


def singleton_groups():
    """One process group per rank (every rank must create every group, in the same order)."""
    groups = [tdist.new_group([r]) for r in range(tdist.get_world_size())]
    return groups[tdist.get_rank()]


class BLLPipelineEngine(AccountedPipelineEngine):
    def __init__(self, *args, feedback=None, table_shape=None, max_inflight_sends: int = 0,
                 readout_max_logits_mb: float = 0.0, variant: str | None = None, **kwargs):
        """feedback: this stage's feedback block (None on the last stage). table_shape: the shape
        of the variant's upstream message ((V, H) for a target table), None if it sends none.
        readout_max_logits_mb: the local readout runs in sequence slices whose logits stay under
        this (0 = one slice). variant: the --bll_variant, which composes the message."""
        super().__init__(*args, **kwargs)
        self.feedback = feedback
        self.table_refresh = get_variant(variant).table_refresh() if variant else 1
        self.max_inflight_sends = max_inflight_sends or SEND_WINDOW_PER_MICRO_BATCH * self.micro_batches
        self._sends: list[tuple[object, torch.Tensor]] = []
        self._step = 0            # the optimizer step being computed (1-based)
        self._micro_batch = 0
        self._records: list[StepRecord] = []
        self._step_started = None
        self._last_update_norm = self._last_grad_norm = None
        replica = self.grid.data_parallel_id
        self.outbox = self.inbox = None
        if table_shape is not None:  # the same on every rank: every rank creates every pair's group
            groups = neighbour_groups(self.num_stages, self.grid.get_data_parallel_world_size(),
                                      lambda k, d: self.grid.stage_to_global(k, data=d))
            if not self.is_first_stage():
                self.outbox = TableOutbox(self.grid.stage_to_global(self.stage_id - 1, data=replica),
                                          groups[(self.stage_id - 1, replica)])
            if not self.is_last_stage():
                dtype = get_variant(variant).message_dtype(next(self.module.parameters()).dtype)
                self.inbox = TableInbox(self.grid.stage_to_global(self.stage_id + 1, data=replica),
                                        tuple(table_shape), dtype, self.device, self.table_refresh,
                                        groups[(self.stage_id, replica)])
        if self.fault.step is not None and self.feedback is not None:
            self.feedback.local_loss = self._with_fault(self.feedback.local_loss)
        # Built after the fault wrappers: the step calls the (possibly wrapped) losses.
        self.stage_step = StageStep(self.feedback, self.module.loss_fn, readout_max_logits_mb, variant)

    def _backward(self, loss: torch.Tensor, scale_by_micro_batches: bool) -> None:
        ds_internals.stage_backward(self, loss, scale_by_micro_batches)

    def training_step(self) -> int:
        return self._step

    def step_losses(self) -> list[torch.Tensor]:
        return self.stage_step.losses

    def start_feedback(self, resumed_step: int) -> None:
        """Fresh run: pass the initial tables P_0 down the pipe, last stage first (a one-time
        chain). Resumed run: the inbox queue came from the checkpoint; the outbox count follows
        from the step."""
        if resumed_step > 0:
            if self.outbox is not None:
                self.outbox.published = tables_published(resumed_step, self.table_refresh)
            return
        if self.inbox is not None:
            self.stage_step.begin(self.inbox.table_for_step(1))
        self._publish_table(0)

    def _publish_table(self, completed_step: int) -> None:
        """Send this stage's current table upstream (non-blocking) and count it, after the steps
        the refresh period picks (feedback_channel.py)."""
        if self.outbox is None or not publishes_after(completed_step, self.table_refresh):
            return
        head = self.module.forward_funcs[-1].lm_head.weight if self.is_last_stage() else None
        table = self.stage_step.table_to_publish(head, self.module.forward_funcs)
        with self.accounting.p2p():
            self.outbox.publish(table)
        self.accounting.count("tables_sent", tensor_bytes(table), "bytes_up")

    # ---- the training entry ---------------------------------------------------------------------
    def train_steps(self, first_step: int, num_steps: int, batch_fn, track_update_at=()) -> dict[int, list]:
        """Run optimizer steps first_step+1 .. first_step+num_steps with the block-local schedule,
        then drain what is in flight (the only point where stages wait for each other)."""
        self.module.train()
        self._batch_fn = batch_fn
        self._track_update_at = set(track_update_at)
        self._records = []
        self._step_started = self.accounting.now()
        sched = bll.BLLTrainSchedule(micro_batches=self.micro_batches, stages=self.num_stages,
                                     stage_id=self.stage_id, first_step=first_step, num_steps=num_steps)
        ds_internals.run_schedule(self, sched)
        # The drain belongs to the call's last step: it is wall time the pipe spends emptying.
        start = self.accounting.now()
        self.drain(first_step + num_steps)
        waited = self.accounting.now() - start
        last = self._records[-1]
        last.step_s += waited
        last.idle_s += waited
        self.accounting.counters.idle_s += waited
        self.tracer.set_step(None)
        return {self.stage_id: self._records}

    def drain(self, completed_step: int) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []
        if self.outbox is not None:
            self.outbox.flush()
        if self.inbox is not None:
            self.inbox.drain(published=tables_published(completed_step, self.table_refresh))
            self.accounting.counters.tables_received = self.inbox.received

    # ---- instructions ----------------------------------------------------------------------------
    def _bll_begin_step(self, step):
        self._step, self._micro_batch = step, 0
        self.tracer.set_step(step, self.weights)
        torch.manual_seed(self.seed_for_step(step))
        table = None
        if self.inbox is not None:
            with self.accounting.p2p():
                table = self.inbox.table_for_step(step)
        self.stage_step.begin(table)

    def _bll_load_micro_batch(self, buffer_id):
        inputs, labels = self._batch_fn(self._step - 1, self._micro_batch, self.micro_batches)
        self._micro_batch += 1
        buffers = ds_internals.pipe_buffers(self)
        if self.is_first_stage():
            buffers["inputs"][buffer_id] = inputs.to(self.device)
        buffers["labels"][buffer_id] = labels.to(self.device)

    def _bll_recv_activations(self, buffer_id):
        with self.accounting.p2p():
            ds_internals.recv_activations(self, buffer_id)
        received = ds_internals.pipe_buffers(self)["inputs"][buffer_id]
        received.requires_grad_(False)  # no gradient goes back upstream
        self.accounting.count("acts_received")

    def _bll_forward(self, buffer_id):
        ds_internals.start_throughput_timer(self)
        buffers = ds_internals.pipe_buffers(self)
        buffers["outputs"][buffer_id] = ds_internals.stage_forward(self, buffers["inputs"][buffer_id])

    def _bll_send_activations(self, buffer_id):
        outputs = ds_internals.pipe_buffers(self)["outputs"][buffer_id].detach()
        with self.accounting.p2p():
            ds_internals.send_tensor_meta_once(self, outputs)
            while len(self._sends) >= self.max_inflight_sends:
                self._sends.pop(0)[0].wait()
            # Completed sends release their output now, not when the window fills: the window
            # bounds memory only in the worst case (a slow receiver).
            while self._sends and self._sends[0][0].is_completed():
                self._sends.pop(0)
        dst = self.grid.stage_to_global(self.next_stage, data=self.grid.data_parallel_id)
        self._sends.append((tdist.isend(outputs, dst), outputs))
        self.accounting.count("acts_sent", tensor_bytes(outputs), "bytes_down")

    def _bll_local_backward(self, buffer_id):
        buffers = ds_internals.pipe_buffers(self)
        self.stage_step.local_backward(buffers["outputs"][buffer_id], buffers["labels"][buffer_id], self._backward)
        buffers["outputs"][buffer_id] = None
        buffers["inputs"][buffer_id] = None

    def _bll_finish_step(self):
        self.stage_step.finish_feedback(self._backward)

    def _bll_optimizer_step(self, lr_kwargs=None):
        # self.nonfinite was decided at ReduceGrads, by this stage (and its replicas) alone.
        tracked = not self.nonfinite and self._step in self._track_update_at
        before = self._snapshot() if tracked else None
        self._last_grad_norm = self._local_grad_norm() if tracked else None
        guarded_optimizer_step(self, lr_kwargs)
        self._last_update_norm = self._update_norm(before) if tracked else None

    def _local_grad_norm(self) -> float | None:
        """This stage's gradient norm before clipping (tracked steps only). With ZeRO-1 the
        gradients live in the optimizer's partitions; DeepSpeed's own norm is used there."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None

    def _bll_publish_table(self):
        self._publish_table(self._step)
        now = self.accounting.now()
        step_s, self._step_started = now - self._step_started, now
        busy, idle = self.accounting.end_step(step_s)
        self._records.append(StepRecord(
            step=self._step, loss=self.stage_step.mean_loss(), step_s=step_s, busy_s=busy,
            idle_s=idle, lr=self.get_lr()[0],
            grad_norm=None if self.nonfinite else _as_float(self.get_global_grad_norm()) or self._last_grad_norm,
            update_norm=self._last_update_norm, nonfinite=self.nonfinite, terms=self.stage_step.mean_terms()))

    _INSTRUCTION_MAP = {
        **AccountedPipelineEngine._INSTRUCTION_MAP,  # already traced
        **traced({
            bll.BeginStep: _bll_begin_step,
            bll.LoadTargets: _bll_load_micro_batch,
            bll.RecvActivationBLL: _bll_recv_activations,
            bll.ForwardBLL: _bll_forward,
            bll.SendActivationBLL: _bll_send_activations,
            bll.LocalBackward: _bll_local_backward,
            bll.FinishStep: _bll_finish_step,
            bll.StageOptimizerStep: _bll_optimizer_step,
            bll.PublishTable: _bll_publish_table,
        }),
    }

    def weights(self) -> list[torch.Tensor]:
        extra = [] if self.feedback is None else [*self.feedback.parameters(), *self.feedback.buffers()]
        return super().weights() + extra

    # ---- checkpoint state beyond DeepSpeed's own files ---------------------------------------------
    def extra_state(self) -> dict:
        return {"feedback": self.feedback.state_dict() if self.feedback is not None else None,
                "inbox": self.inbox.state_dict() if self.inbox is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        if self.inbox is not None:
            self.inbox.load_state_dict(state["inbox"])
