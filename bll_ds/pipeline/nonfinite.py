"""Steps with a non-finite loss or gradient: found before the gradient all-reduce, agreed by every
rank that shares the update, and never applied.

Who must agree is exactly who shares DeepSpeed's gradient-norm reduction: the model-parallel
group (all stages of a backprop pipeline; a block-local stage alone, see StageLocalGrid) and the
data-parallel group (a stage's replicas). Block-local learning therefore decides per stage, with
no collective across stages; backprop adds one scalar all-reduce per step to a pipeline that
already reduces its gradient norm over the same group.

A skipped step keeps its place in the run: the learning-rate schedule and DeepSpeed's step and
sample counters advance as for an applied step. Every stage so stays on the same schedule (in
block-local learning stages skip independently), and a resumed run lines up with an
uninterrupted one. DeepSpeed's own overflow skip (fp16 loss scaling, and the bf16 and ZeRO
optimizers on an invalid gradient norm) holds the schedule back instead; it stays in place
behind this check as a backstop, and `after_optimizer_step` realigns the schedule when it fires.

Fault injection, for tests and for checking a setup:
BLL_DS_INJECT_NONFINITE="STEP:STAGE[:KIND[:REPLICA]]" makes that stage's training loss at that
step NaN, on every data-parallel replica of the stage or on REPLICA only. KIND "grads" (default)
poisons the loss and its gradients, as a real divergence does; "loss" poisons the reported value
only, so the gradients stay finite and only the loss check can catch it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from bll_ds.pipeline.launched import deepspeed_internals as ds_internals

INJECT_ENV = "BLL_DS_INJECT_NONFINITE"

# Causes, as they appear in StepRecord.nonfinite and in messages.
LOSS, GRADS, PEER, DEEPSPEED = "loss", "gradients", "loss or gradients on another rank", "gradient norm"


def local_cause(losses: list[torch.Tensor], grads) -> str | None:
    """Why this rank's step is non-finite (None if it is finite). `grads`: the accumulated
    gradients before the all-reduce (None entries are skipped); on a launched rank the ones still
    on the parameters, and where DeepSpeed's optimizer has already moved them into its own
    buffers, its overflow check is the backstop."""
    if losses and not bool(torch.isfinite(torch.stack([loss.float().sum() for loss in losses])).all()):
        return LOSS
    grads = [g for g in grads if g is not None]
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return GRADS
    return None


def agreed_cause(engine, cause: str | None) -> str | None:
    """Every rank that shares this update learns whether any of them found a non-finite step.
    A block-local stage without replicas shares it with nobody: no tensor, no device sync."""
    groups = [group for group in (engine.mpu.get_model_parallel_group(), engine.mpu.get_data_parallel_group())
              if tdist.get_world_size(group) > 1]
    if not groups:
        return cause
    flag = torch.tensor([0.0 if cause is None else 1.0], device=engine.device)
    for group in groups:
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=group)
    return cause or (PEER if flag.item() > 0 else None)


def clear_gradients(engine) -> None:
    """Drop this step's gradients the way DeepSpeed's own step does for this optimizer."""
    if engine.bfloat16_enabled() or engine.zero_optimization() or engine.fp16_enabled():
        engine.optimizer.zero_grad()  # BF16 and ZeRO optimizers also hold fp32 copies
    else:
        engine.zero_grad()


def advance_schedule(engine, lr_kwargs) -> None:
    if engine.lr_scheduler is not None:
        try:
            engine.lr_scheduler.step(**(lr_kwargs or {}))
        except TypeError:  # DeepSpeed's schedulers take no kwargs from a pipeline (as in its own step)
            engine.lr_scheduler.step(engine.train_batch_size())


def skip_update(engine, lr_kwargs) -> None:
    """The optimizer step of a skipped step: no update, no optimizer-state change, counters on."""
    clear_gradients(engine)
    advance_schedule(engine, lr_kwargs)
    ds_internals.count_skipped_step(engine)


def after_optimizer_step(engine, lr_kwargs) -> str | None:
    """DeepSpeed's own optimizer skipped the step (an invalid gradient norm after the all-reduce)
    and held the schedule back: advance it, as for every other skipped step."""
    if ds_internals.step_was_applied(engine):
        return None
    advance_schedule(engine, lr_kwargs)
    return DEEPSPEED


class FaultInjection:
    """BLL_DS_INJECT_NONFINITE, parsed once per process."""

    def __init__(self, stage: int, replica: int = 0, spec: str | None = None):
        spec = os.environ.get(INJECT_ENV, "") if spec is None else spec
        self.step = None
        if not spec:
            return
        parts = spec.split(":")
        if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts[:2] + parts[3:]) \
                or (len(parts) >= 3 and parts[2] not in ("grads", "loss")):
            raise ValueError(f"{INJECT_ENV}={spec!r}: expected STEP:STAGE[:grads|loss[:REPLICA]]")
        if int(parts[1]) == stage and (len(parts) < 4 or int(parts[3]) == replica):
            self.step, self.kind = int(parts[0]), (parts[2] if len(parts) >= 3 else "grads")

    def wrap(self, loss_fn, current_step, active=lambda: True):
        """`loss_fn` (returning the loss, or (loss, terms) as a feedback block's local_loss does)
        with this fault applied at its step: `current_step()` is the 1-based step being computed,
        `active()` false where the loss is not a training loss (evaluation). Unchanged when no
        fault is aimed at this stage."""
        if self.step is None:
            return loss_fn

        def loss_with_fault(*args, **kwargs):
            out = loss_fn(*args, **kwargs)
            if not active():
                return out
            if isinstance(out, tuple):
                return (self.apply(out[0], current_step()), *out[1:])
            return self.apply(out, current_step())
        return loss_with_fault

    def apply(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if step != self.step:
            return loss
        nan = torch.full_like(loss, float("nan"))
        return loss * nan if self.kind == "grads" else loss + nan.detach() * loss.detach()
