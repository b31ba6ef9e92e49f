"""DeepSpeed's PipelineEngine (1F1B backprop) with per-stage p2p accounting.

DeepSpeed dispatches schedule instructions through the class attribute `_INSTRUCTION_MAP`, so
overriding a method alone changes nothing: the subclass installs its own map whose p2p entries
wrap the stock methods with timing and counting. The schedule and every numeric path are
DeepSpeed's own; this is the backprop baseline that every block-local claim is measured against.
"""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from bll_ds.engine.accounting import StageAccounting, tensor_bytes


def _send_activations(self, buffer_id):
    with self.accounting.p2p():
        PipelineEngine._exec_send_activations(self, buffer_id)
    self.accounting.count("acts_sent", tensor_bytes(self.pipe_buffers["outputs"][buffer_id]), "bytes_down")


def _recv_activations(self, buffer_id):
    with self.accounting.p2p():
        PipelineEngine._exec_recv_activations(self, buffer_id)
    self.accounting.count("acts_received")


def _send_grads(self, buffer_id):
    # The stock method frees the input buffer whose .grad it sends: measure first.
    inputs = self.pipe_buffers["inputs"][buffer_id]
    grads = inputs.grad if hasattr(inputs, "grad") else [t.grad for t in inputs if t.is_floating_point()]
    n_bytes = tensor_bytes(grads)
    with self.accounting.p2p():
        PipelineEngine._exec_send_grads(self, buffer_id)
    self.accounting.count("grads_sent", n_bytes, "bytes_up")


def _recv_grads(self, buffer_id):
    with self.accounting.p2p():
        PipelineEngine._exec_recv_grads(self, buffer_id)
    self.accounting.count("grads_received")


class AccountedPipelineEngine(PipelineEngine):
    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        schedule.SendActivation: _send_activations,
        schedule.RecvActivation: _recv_activations,
        schedule.SendGrad: _send_grads,
        schedule.RecvGrad: _recv_grads,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accounting = StageAccounting(self.stage_id, self.grid.data_parallel_id)
