"""The one place that reaches into DeepSpeed's private members (pinned: deepspeed 0.19.8).

The engines subclass DeepSpeed's PipelineEngine and run their own instructions, which needs a
few things DeepSpeed does not offer publicly: the stock instruction handlers called unbound, the
engine-level forward and backward that PipelineEngine refuses outside train_batch, the pipe
buffers, the tensor-meta handshake, the counters a skipped step must advance, and the engine
constructed by hand (deepspeed.initialize always builds the stock class). Everything of that kind
is a function here, so that the rest of the code never names a private DeepSpeed member.

`check_deepspeed()` runs when an engine is built, before any process group traffic: if the
installed DeepSpeed lacks a member this module uses, it stops with the member's name and the
pinned version, instead of an AttributeError deep inside a launched rank.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from bll_ds.infra.errors import UserError

PINNED_VERSION = "0.19.8"  # pyproject.toml pins the same

# Members looked up on the classes (methods and class attributes) ...
CLASS_MEMBERS = {
    PipelineEngine: ("_INSTRUCTION_MAP", "_exec_schedule", "_exec_send_activations", "_exec_recv_activations",
                     "_exec_send_grads", "_exec_recv_grads", "_exec_reduce_grads", "_exec_optimizer_step",
                     "_send_tensor_meta", "train_batch", "eval_batch", "is_first_stage", "is_last_stage"),
    DeepSpeedEngine: ("forward", "backward", "_configure_python_gc", "get_global_grad_norm", "get_lr",
                      "zero_grad", "bfloat16_enabled", "fp16_enabled", "zero_optimization", "train_batch_size"),
    BF16_Optimizer: ("clear_lp_grads",),
}
SCHEDULE_MEMBERS = ("PipeSchedule", "PipeInstruction", "BufferOpInstruction", "SendActivation", "RecvActivation",
                    "SendGrad", "RecvGrad", "ReduceGrads", "OptimizerStep")
# ... and on a constructed engine (set in DeepSpeed's __init__).
INSTANCE_MEMBERS = ("pipe_buffers", "first_output_send", "next_stage", "tput_timer", "global_steps",
                    "global_samples", "skipped_steps", "total_loss", "micro_batches", "grid", "module",
                    "optimizer", "lr_scheduler", "mpu")


def _mismatch(member: str) -> UserError:
    return UserError(f"the installed DeepSpeed {deepspeed.__version__} has no {member}, which bll-ds uses "
                     f"(bll_ds/pipeline/launched/deepspeed_internals.py); bll-ds is built against deepspeed {PINNED_VERSION}.",
                     f"install the pinned version: pip install --no-build-isolation deepspeed=={PINNED_VERSION} "
                     f"(or `make venv`).")


def check_deepspeed() -> None:
    """Every class-level member this module touches exists (fast: attribute look-ups only)."""
    for cls, members in CLASS_MEMBERS.items():
        for member in members:
            if not hasattr(cls, member):
                raise _mismatch(f"{cls.__name__}.{member}")
    for member in SCHEDULE_MEMBERS:
        if not hasattr(schedule, member):
            raise _mismatch(f"deepspeed.runtime.pipe.schedule.{member}")


def check_engine(engine) -> None:
    """The instance attributes this module reads exist on a freshly constructed engine."""
    for member in INSTANCE_MEMBERS:
        if not hasattr(engine, member):
            raise _mismatch(f"PipelineEngine instance attribute {member}")


# ---- construction ------------------------------------------------------------------------------

def construct_pipeline_engine(engine_class, module, grid, ds_config: dict, model_parameters, **kwargs):
    """Build `engine_class` (a PipelineEngine subclass) as deepspeed.initialize builds the stock
    PipelineEngine: the same config class and optimizer flags, the mpu from the PipelineModule."""
    check_deepspeed()
    config_class = DeepSpeedConfig(ds_config, grid)
    deepspeed.set_optimizer_flags(config_class, module)
    engine = engine_class(args=None, model=module, model_parameters=model_parameters, mpu=grid,
                          config=ds_config, config_class=config_class, **kwargs)
    engine._configure_python_gc()
    check_engine(engine)
    return engine


def set_master_weights(engine, values) -> None:
    """After the stage's parameters were overwritten in place (weights loaded into a built
    engine, bll_ds/run/init_weights.py): make the optimizer's own copies agree, or its first step
    writes the old weights back. `values`: (parameter, new value) pairs.

    fp32 without ZeRO: the torch optimizer updates the parameters themselves; nothing to do.
    bf16 (BF16_Optimizer) and ZeRO-1 (DeepSpeedZeroOptimizer, fp32 too): fp32 flat partitions,
    refreshed from the parameters (`refresh_fp32_params`), then set to the exact values where
    DeepSpeed links a parameter to its fragment of the partition (`safe_set_full_fp32_param`;
    in bf16 the refresh alone would round the masters to bf16).
    """
    from deepspeed.utils import safe_set_full_fp32_param

    optimizer = engine.optimizer
    if optimizer is None or optimizer is getattr(engine, "basic_optimizer", None):
        return
    refresh = getattr(optimizer, "refresh_fp32_params", None)
    if refresh is None:
        raise _mismatch(f"{type(optimizer).__name__}.refresh_fp32_params")
    refresh()
    for param, value in values:
        safe_set_full_fp32_param(param, value.detach().to(torch.float32))


def master_weights(engine) -> list[torch.Tensor]:
    """The stage's trainable weights in fp32 as its optimizer holds them: copies of DeepSpeed's
    fp32 masters under bf16 or ZeRO (gathered across the data-parallel group: a collective), the
    parameters themselves otherwise (not copies: step_record.snapshot copies). Frozen copies
    (refreshed from messages) are left out."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = []
    for param in engine.module.parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)
            weights.append((param.detach() if master is None else master).float())
    return weights


# ---- stock handlers, called unbound on our subclasses --------------------------------------------

def stock_instruction_map() -> dict:
    """DeepSpeed's instruction class -> handler map, which our engines extend."""
    return dict(PipelineEngine._INSTRUCTION_MAP)


def run_schedule(engine, pipe_schedule) -> None:
    engine._exec_schedule(pipe_schedule)


def send_activations(engine, buffer_id: int) -> None:
    PipelineEngine._exec_send_activations(engine, buffer_id)


def recv_activations(engine, buffer_id: int) -> None:
    PipelineEngine._exec_recv_activations(engine, buffer_id)


def send_grads(engine, buffer_id: int) -> None:
    PipelineEngine._exec_send_grads(engine, buffer_id)


def recv_grads(engine, buffer_id: int) -> None:
    PipelineEngine._exec_recv_grads(engine, buffer_id)


def reduce_grads(engine) -> None:
    PipelineEngine._exec_reduce_grads(engine)


def optimizer_step(engine, lr_kwargs=None) -> None:
    PipelineEngine._exec_optimizer_step(engine, lr_kwargs)


def stage_forward(engine, inputs):
    """The engine-level forward (precision casts, hooks) that PipelineEngine.forward refuses to
    run outside its own schedule. Under bf16 the output's backward prologue is disarmed: see
    stage_backward, which runs what it would have done at the right moment."""
    outputs = DeepSpeedEngine.forward(engine, inputs)
    if _bf16_optimizer(engine) and outputs.grad_fn is not None:
        managers = getattr(outputs, "_backward_hook_managers", None)
        if not managers or not all(hasattr(manager, "preprocess_done") for manager in managers):
            raise _mismatch("OutputBackwardHookManager.preprocess_done on the forward output")
        for manager in managers:
            manager.preprocess_done = True
    return outputs


def stage_backward(engine, loss, scale_by_micro_batches: bool = True) -> None:
    """DeepSpeed's backward (loss scaling, bf16/ZeRO gradient hooks), dividing by the
    gradient-accumulation steps when asked, as it does for every micro-batch of its own.

    Each call adds exactly this call's gradients to the stage's accumulated ones. DeepSpeed's
    engine assumes one backward per forward, whose root is the forward's output; a block-local
    stage runs several (each readout slice, the block from their gradient, the feedback network
    at the step end) whose roots lie past the output. Under bf16 (BF16_Optimizer) the engine's
    backward ends by adding the parameters' bf16 gradients into its accumulators and leaves them
    in place, and the clearing that should come first runs from a hook on the forward output:
    mid-graph, after the local readout's gradients were written (they were zeroed), and not at
    all for a backward that never reaches the output (the previous call's were added again). So
    the clear runs here, before every call, as DeepSpeed's own pipeline clears before each of
    its non-last stages' backward, and stage_forward disarms the hook's."""
    if _bf16_optimizer(engine):
        engine.optimizer.clear_lp_grads()
    DeepSpeedEngine.backward(engine, loss, scale_wrt_gas=scale_by_micro_batches)


def _bf16_optimizer(engine) -> bool:
    return isinstance(engine.optimizer, BF16_Optimizer)


def send_tensor_meta_once(engine, outputs) -> None:
    """The shape/dtype handshake the receiving stage's stock RecvActivation expects, once."""
    if engine.first_output_send:
        engine.first_output_send = False
        engine._send_tensor_meta(outputs, engine.next_stage)


def start_throughput_timer(engine) -> None:
    engine.tput_timer.start()


def pipe_buffers(engine) -> dict:
    """DeepSpeed's per-buffer slots: "inputs", "labels", "outputs"."""
    return engine.pipe_buffers


def last_stage_loss(engine):
    """The loss DeepSpeed's last stage computed in the current train_batch (a tensor, or None)."""
    return engine.total_loss


# ---- the counters a skipped step advances -------------------------------------------------------

def count_skipped_step(engine) -> None:
    """What DeepSpeed's own overflow skip does to its counters, minus holding the schedule back."""
    engine._step_applied = False
    engine.skipped_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.losses = None


def step_was_applied(engine) -> bool:
    """False when DeepSpeed's optimizer skipped its last step (an invalid gradient norm)."""
    return getattr(engine, "_step_applied", True)
