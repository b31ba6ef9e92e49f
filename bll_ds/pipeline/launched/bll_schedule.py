"""The block-local schedule: per micro-batch every stage receives, forwards, sends, and runs its
local backward; at the step boundary it steps its own optimizer. What each instruction computes
is bll_ds/method/stage_step.py's. There is no SendGrad/RecvGrad
and no instruction waits for a later stage.

One schedule covers `num_steps` optimizer steps (one `train_steps` call), so the pipe fills once
per call, not once per step.
"""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds_schedule

from bll_ds.method.stage_step import STEP_END


class BeginStep(ds_schedule.PipeInstruction):
    """Take this step's feedback table (lagged, see feedback_channel.py) and reset accumulators."""


class LoadTargets(ds_schedule.BufferOpInstruction):
    """Every stage loads its micro-batch's targets itself (the first stage also its inputs)."""


class RecvActivationBLL(ds_schedule.BufferOpInstruction):
    """Blocking receive of the upstream stage's detached output."""


class ForwardBLL(ds_schedule.BufferOpInstruction):
    """This stage's layers on the received (or loaded) input."""


class SendActivationBLL(ds_schedule.BufferOpInstruction):
    """Non-blocking send of the detached output downstream, within a bounded window."""


class LocalBackward(ds_schedule.BufferOpInstruction):
    """Local loss of this stage against its own targets, and backward inside the stage only."""


class FinishStep(ds_schedule.PipeInstruction):
    """Push the step's accumulated table gradient through this stage's feedback block."""


class StageOptimizerStep(ds_schedule.PipeInstruction):
    """DeepSpeed's optimizer step; its clip reduces over this stage only (StageLocalGrid)."""


class PublishTable(ds_schedule.PipeInstruction):
    """Send this stage's updated target table upstream (non-blocking)."""


# The step boundary as instructions, in bll_ds/method/stage_step.py's STEP_END order.
STEP_END_INSTRUCTIONS = {"finish_feedback": FinishStep, "reduce_grads": ds_schedule.ReduceGrads,
                         "optimizer_step": StageOptimizerStep, "publish_table": PublishTable}


class BLLTrainSchedule(ds_schedule.PipeSchedule):
    """Distinct instruction types (not DeepSpeed's LoadMicroBatch, ForwardPass, ...), so that the
    engine's evaluation, which runs DeepSpeed's stock inference schedule, keeps the stock methods."""

    def __init__(self, micro_batches: int, stages: int, stage_id: int, first_step: int, num_steps: int):
        super().__init__(micro_batches=micro_batches, stages=stages, stage_id=stage_id)
        self.first_step = first_step
        self.num_steps = num_steps

    def num_pipe_buffers(self) -> int:
        return 1  # a micro-batch is finished (forward + local backward) before the next starts

    def steps(self):
        for offset in range(self.num_steps):
            yield [BeginStep(step=self.first_step + offset + 1)]
            for _ in range(self.micro_batches):
                cmds = [LoadTargets(buffer_id=0)]
                if not self.is_first_stage:
                    cmds.append(RecvActivationBLL(buffer_id=0))
                cmds.append(ForwardBLL(buffer_id=0))
                if not self.is_last_stage:
                    cmds.append(SendActivationBLL(buffer_id=0))
                cmds.append(LocalBackward(buffer_id=0))
                yield cmds
            yield [STEP_END_INSTRUCTIONS[name]() for name in STEP_END]
