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

from deepspeed.runtime.pipe import schedule as ds_schedule

from bll_ds.method.stage_step import StageStep
from bll_ds.pipeline.accounting import tensor_bytes
from bll_ds.pipeline.block_local_stage import BlockLocalStage
from bll_ds.pipeline.feedback_channel import TableInbox, TableOutbox, message_groups, tables_published
from bll_ds.pipeline.launched import bll_schedule as bll
from bll_ds.pipeline.launched import deepspeed_internals as ds_internals
from bll_ds.pipeline.launched.pipeline_engine import (AccountedPipelineEngine, _as_float, guarded_optimizer_step,
                                           guarded_reduce_grads)
from bll_ds.pipeline.step_record import StepRecord, step_seed
from bll_ds.pipeline.trace import traced


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


class LaunchedCompute:
    """A launched stage's numerics for BlockLocalStage: DeepSpeed's backward, gradient
    all-reduce and optimizer step, with the non-finite guard (pipeline/nonfinite.py)."""

    def __init__(self, engine: "BLLPipelineEngine"):
        self.engine = engine

    def begin_step(self, step: int) -> None:
        torch.manual_seed(step_seed(self.engine.seed, step, self.engine.global_rank))

    def backward(self, loss: torch.Tensor, scale_by_micro_batches: bool) -> None:
        ds_internals.stage_backward(self.engine, loss, scale_by_micro_batches)

    def reduce_grads(self, losses: list[torch.Tensor]) -> str | None:
        guarded_reduce_grads(self.engine)
        return self.engine.nonfinite

    def optimizer_step(self, cause: str | None, tracked: bool) -> tuple[str | None, float | None]:
        local = self._local_grad_norm() if tracked else None
        guarded_optimizer_step(self.engine, self.engine.lr_kwargs)
        cause = self.engine.nonfinite
        return cause, None if cause else _as_float(self.engine.get_global_grad_norm()) or local

    def _local_grad_norm(self) -> float | None:
        """This stage's gradient norm before clipping (tracked steps only). With ZeRO-1 the
        gradients live in the optimizer's partitions; DeepSpeed's own norm is used there."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None

    def master_weights(self) -> list[torch.Tensor]:
        return ds_internals.master_weights(self.engine)

    def lr(self) -> float:
        return self.engine.get_lr()[0]


class LaunchedTransport:
    """The tables between neighbouring launched stages (feedback_channel.py), counted."""

    def __init__(self, engine: "BLLPipelineEngine", inbox: TableInbox | None, outboxes: list[TableOutbox],
                 refresh: int):
        """outboxes: one per receiving stage (one, stage k-1; every other stage, from the last
        stage under direct feedback; none)."""
        self.engine, self.inbox, self.outboxes, self.refresh = engine, inbox, outboxes, refresh
        self.receives, self.sends = inbox is not None, bool(outboxes)

    def table_for_step(self, step: int) -> torch.Tensor:
        with self.engine.accounting.p2p():
            return self.inbox.table_for_step(step)

    def publish(self, table: torch.Tensor, completed_step: int) -> None:
        for outbox in self.outboxes:
            with self.engine.accounting.p2p():
                outbox.publish(table)
            self.engine.accounting.count("tables_sent", tensor_bytes(table), "bytes_up")

    def resume(self, completed_step: int) -> None:
        for outbox in self.outboxes:
            outbox.published = tables_published(completed_step, self.refresh)

    def drain(self, completed_step: int) -> None:
        for outbox in self.outboxes:
            outbox.flush()
        if self.inbox is not None:
            self.inbox.drain(published=tables_published(completed_step, self.refresh))
            self.engine.accounting.counters.tables_received = self.inbox.received


class BLLPipelineEngine(AccountedPipelineEngine):
    def __init__(self, *args, feedback=None, variant=None, table_shape=None,
                 max_inflight_sends: int = 0, readout_max_logits_mb: float = 0.0, **kwargs):
        """feedback: this stage's feedback block (None where it holds none: Variant.holds_block). variant: the run's
        Variant (method/variants.py), resolved once: it decides the message upstream (its
        dtype and refresh period). table_shape: the message's shape ((V, H) for a target
        table), None if it sends none. readout_max_logits_mb: the local readout runs in sequence
        slices whose logits stay under this (0 = one slice)."""
        super().__init__(*args, **kwargs)
        self.feedback = feedback
        self.max_inflight_sends = max_inflight_sends or SEND_WINDOW_PER_MICRO_BATCH * self.micro_batches
        self._sends: list[tuple[object, torch.Tensor]] = []
        self._micro_batch = 0
        self._records: list[StepRecord] = []
        self._step_started = None
        self.lr_kwargs = None
        refresh = variant.table_refresh() if variant is not None else 1
        replica = self.grid.data_parallel_id
        outboxes, inbox = [], None
        if table_shape is not None:  # the same on every rank: every rank creates every pair's group
            stages = self.num_stages
            sources = {k: variant.message_source(k, stages) for k in range(stages - 1)}
            groups = message_groups(sources, self.grid.get_data_parallel_world_size(),
                                    lambda k, d: self.grid.stage_to_global(k, data=d))
            outboxes = [TableOutbox(self.grid.stage_to_global(k, data=replica), groups[(k, replica)])
                        for k in variant.message_destinations(self.stage_id, stages)]
            if not self.is_last_stage():
                dtype = variant.message_dtype(next(self.module.parameters()).dtype)
                inbox = TableInbox(self.grid.stage_to_global(sources[self.stage_id], data=replica),
                                   tuple(table_shape), dtype, self.device, refresh, groups[(self.stage_id, replica)])
        self.transport = LaunchedTransport(self, inbox, outboxes, refresh)
        if self.feedback is not None:
            self.feedback.local_loss = self.fault.wrap(self.feedback.local_loss, self.training_step,
                                                       lambda: self.module.training)
        # After the fault wrappers: the step calls the (possibly wrapped) losses.
        step = StageStep(self.feedback, self.module.loss_fn, self.is_last_stage(), readout_max_logits_mb, variant)
        self.stage = BlockLocalStage(step, self.module.forward_funcs, self.is_last_stage(), refresh,
                                     LaunchedCompute(self), self.transport)

    def training_step(self) -> int:
        return self.stage.current

    def step_losses(self) -> list[torch.Tensor]:
        return self.stage.stage_step.losses

    def start_feedback(self, resumed_step: int) -> None:
        self.stage.start(resumed_step)

    # ---- the training entry ---------------------------------------------------------------------
    def train_steps(self, first_step: int, num_steps: int, batch_fn, track_update_at=(), on_step=None) -> dict[int, list]:
        """Run optimizer steps first_step+1 .. first_step+num_steps with the block-local schedule,
        then drain what is in flight (the only point where stages wait for each other).
        on_step(record): called as each of this stage's steps ends (the progress bar)."""
        self.module.train()
        self._batch_fn = batch_fn
        self._on_step = on_step
        self.stage.track_update_at = set(track_update_at)
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
        self._average_losses_over_replicas()
        return {self.stage_id: self._records}

    def _average_losses_over_replicas(self) -> None:
        """Each record's loss as the mean over the stage's replicas, as DeepSpeed reports backprop's
        (the replicas train on disjoint shares of one global batch): one all-reduce per engine call.
        A replica's non-finite loss makes the mean non-finite, as the step is for all of them."""
        replicas = self.grid.get_data_parallel_world_size()
        if replicas == 1:
            return
        losses = torch.tensor([r.loss for r in self._records], dtype=torch.float64, device=self.device)
        tdist.all_reduce(losses, group=self.grid.get_data_parallel_group())
        for record, loss in zip(self._records, (losses / replicas).tolist()):
            record.loss = loss

    def drain(self, completed_step: int) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []
        self.transport.drain(completed_step)

    # ---- instructions ----------------------------------------------------------------------------
    def _bll_begin_step(self, step):
        self._micro_batch = 0
        self.tracer.set_step(step, self.weights)
        self.stage.begin(step)

    def _bll_load_micro_batch(self, buffer_id):
        inputs, labels = self._batch_fn(self.stage.current - 1, self._micro_batch, self.micro_batches)
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
        self.stage.local_backward(buffers["outputs"][buffer_id], buffers["labels"][buffer_id], buffers["inputs"][buffer_id])
        buffers["outputs"][buffer_id] = None
        buffers["inputs"][buffer_id] = None

    def _bll_finish_step(self):
        self.stage.finish_feedback()

    def _bll_reduce_grads(self):
        self.stage.reduce_grads()

    def _bll_optimizer_step(self, lr_kwargs=None):
        self.lr_kwargs = lr_kwargs
        self.stage.optimizer_step()

    def _bll_publish_table(self):
        self.stage.publish_table()
        now = self.accounting.now()
        step_s, self._step_started = now - self._step_started, now
        busy, idle = self.accounting.end_step(step_s)
        self._records.append(self.stage.record(step_s, busy, idle))
        if self._on_step is not None:
            self._on_step(self._records[-1])

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
            ds_schedule.ReduceGrads: _bll_reduce_grads,
            bll.StageOptimizerStep: _bll_optimizer_step,
            bll.PublishTable: _bll_publish_table,
        }),
    }

    def weights(self) -> list[torch.Tensor]:
        extra = [] if self.feedback is None else [*self.feedback.parameters(), *self.feedback.buffers()]
        return super().weights() + extra

    # ---- checkpoint state beyond DeepSpeed's own files ---------------------------------------------
    def extra_state(self) -> dict:
        inbox = self.transport.inbox
        return {"feedback": self.feedback.state_dict() if self.feedback is not None else None,
                "inbox": inbox.state_dict() if inbox is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        if self.transport.inbox is not None:
            self.transport.inbox.load_state_dict(state["inbox"])
