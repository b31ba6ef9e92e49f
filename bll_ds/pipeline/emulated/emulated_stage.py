"""One pipeline stage inside the one-process emulator (bll_ds/pipeline/emulated/emulator.py).

A stage here owns what a launched stage's rank owns: its layers (and feedback block), its own
optimizer and learning-rate schedule built from the same DeepSpeed config, its own RNG stream,
traffic counters and skip count. The numerics follow DeepSpeed's fp32 path step for step:

    backward      loss / M per micro-batch (DeepSpeed's scale_wrt_gas), gradients accumulate
    clip          by this stage's own norm (BLL) or by the global norm the emulator passes (BP)
    step          torch.optim.AdamW/Adam (the config's "torch_adam": true), then the scheduler
                  from deepspeed.runtime.lr_schedules, constructed as DeepSpeed constructs it
    skip          a non-finite step drops its gradients and advances the schedule (pipeline/nonfinite.py)

bf16 (the config's "bf16": {"enabled": true}) is DeepSpeed's BF16_Optimizer: bf16 weights for
compute, fp32 master weights and optimizer state, and after every backward call the bf16
gradients are added into accumulators of DeepSpeed's gradient-accumulation dtype (bf16 without
ZeRO, fp32 with ZeRO-1 and "grad_accum_dtype": "fp32"; DsSettings.grad_accum_dtype), rounded
once per step to the dtype DeepSpeed all-reduces them in (DsSettings.communication_dtype: bf16
unless the config says otherwise), clipped, and handed to the optimizer in fp32. These are
DeepSpeed's rounding steps in DeepSpeed's order; kernels may still sum in another order (the
emulator's intra-op pool has every core's threads, a launched rank one), so the two agree within
a fraction of one bf16 rounding, not always bit for bit (tests/test_bf16.py).
"""

from __future__ import annotations

import contextlib

import torch
from deepspeed.runtime import lr_schedules
from torch import nn

from bll_ds.infra.errors import UserError
from bll_ds.modeling.checkpointing import run_layers
from bll_ds.pipeline.accounting import StageAccounting
from bll_ds.pipeline.build import weight_decay_groups
from bll_ds.pipeline.nonfinite import FaultInjection, local_cause
from bll_ds.pipeline.step_record import step_seed
from bll_ds.pipeline.trace import StageTracer

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def build_optimizer(param_groups: list[dict], ds_config: dict) -> torch.optim.Optimizer:
    """The optimizer DeepSpeed builds for {"type": "AdamW"|"Adam", "params": {..., "torch_adam": true}}."""
    spec = ds_config.get("optimizer") or {}
    params = dict(spec.get("params", {}))
    kind = str(spec.get("type", "")).lower()
    if kind not in TORCH_OPTIMIZERS or not params.pop("torch_adam", False):
        raise UserError(f"--emulate runs torch's Adam/AdamW, the optimizer DeepSpeed builds for "
                        f"\"torch_adam\": true; the DeepSpeed config asks for {spec or 'no optimizer'}.",
                        'set "optimizer": {"type": "AdamW", "params": {..., "torch_adam": true}}, '
                        "or train with the launcher.")
    adam_w_mode = params.pop("adam_w_mode", True)
    optimizer_class = torch.optim.AdamW if kind == "adamw" or adam_w_mode else torch.optim.Adam
    return optimizer_class(param_groups, foreach=params.pop("foreach", None), **params)


def build_scheduler(optimizer, ds_config: dict):
    spec = ds_config.get("scheduler")
    if not spec:
        return None
    scheduler_class = getattr(lr_schedules, spec["type"], None) or getattr(torch.optim.lr_scheduler, spec["type"])
    return scheduler_class(optimizer, **spec.get("params", {}))


def _rng_states() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


class EmulatedStage:
    def __init__(self, stage_id: int, layers: list[tuple[int, nn.Module]], feedback: nn.Module | None,
                 ds_config: dict, micro_batches: int, device, bf16: bool, seed: int,
                 activation_checkpoint_interval: int = 0, grad_accum_dtype: torch.dtype = torch.float32,
                 communication_dtype: torch.dtype = torch.float32):
        """layers: (position in the pipeline, layer) pairs, as DeepSpeed numbers its layer files.
        activation_checkpoint_interval: as the launched PipelineModule's (modeling/checkpointing.py).
        grad_accum_dtype, communication_dtype: bf16 only, as DsSettings names them."""
        self.stage_id = stage_id
        self.layer_index = [index for index, _ in layers]
        self.module = nn.Module()  # layers and feedback, as a launched stage's module holds them
        self.module.layers = nn.ModuleList(layer for _, layer in layers)
        if feedback is not None:
            self.module.bll_feedback = feedback
        self.feedback = feedback
        self.module.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
        self.micro_batches, self.seed, self.device = micro_batches, seed, device
        self.activation_checkpoint_interval = activation_checkpoint_interval
        # Trainable parameters only: a frozen copy (bll_ds/method/overlap.py) is refreshed from the
        # downstream stage's message, never by this stage's optimizer or bf16 master copy.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        # fp32 path: the parameters are their own masters and accumulate their own gradients.
        # bf16: fp32 copies hold the update; gradients accumulate in `accumulated`.
        self.masters = [p.detach().float().clone() for p in self.params] if bf16 else self.params
        self.grad_accum_dtype, self.communication_dtype = grad_accum_dtype, communication_dtype
        self.accumulated: list[torch.Tensor | None] = [None] * len(self.params)
        groups = weight_decay_groups(self.module)
        # The order the gradient norm adds parameters in: DeepSpeed's fp32 clip goes through the
        # parameters, its bf16 optimizer group by group. Another order changes the sum's last bit.
        self.norm_order = list(range(len(self.params)))
        if bf16:
            index_of = {id(p): i for i, p in enumerate(self.params)}
            self.norm_order = [index_of[id(p)] for g in groups for p in g["params"]]
            master_of = {id(p): m for p, m in zip(self.params, self.masters)}
            groups = [{**g, "params": [master_of[id(p)] for p in g["params"]]} for g in groups]
        self.optimizer = build_optimizer(groups, ds_config)
        self.scheduler = build_scheduler(self.optimizer, ds_config)
        self.clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        self.accounting = StageAccounting(stage_id, 0, device)  # on CUDA its clock synchronizes
        self.tracer = StageTracer(stage_id, range(0), device)
        self.fault = FaultInjection(stage_id, 0)
        self.skipped_steps = 0
        self.step = 0  # the optimizer step being computed (1-based)
        self.busy_s = 0.0  # this step's compute time on this stage
        self._rng = None

    # ---- per step ----------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Reseed from (seed, step, rank) as a launched rank does (step_record.step_seed): the
        stage's RNG stream (CPU, and CUDA where present) is that of the rank that would run it,
        whose global rank is the stage's (one replica)."""
        self.step, self.busy_s = step, 0.0
        outer = _rng_states()
        torch.manual_seed(step_seed(self.seed, step, self.stage_id))
        self._rng = _rng_states()
        _set_rng_states(outer)

    @contextlib.contextmanager
    def running(self):
        """This stage's RNG stream and compute clock, around any of its work."""
        outer = _rng_states()
        _set_rng_states(self._rng)
        start = self.accounting.now()
        try:
            yield
        finally:
            self.busy_s += self.accounting.now() - start
            self._rng = _rng_states()
            _set_rng_states(outer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's layers, in PipelineModule's checkpointed groups when the interval is set."""
        return run_layers(list(self.module.layers), x, self.activation_checkpoint_interval)

    def backward(self, loss: torch.Tensor, scale_by_micro_batches: bool) -> None:
        (loss / self.micro_batches if scale_by_micro_batches else loss).backward()
        self.accumulate_grads()

    def accumulate_grads(self) -> None:
        """bf16: add the bf16 gradients into the accumulators, as DeepSpeed's update_hp_grads
        does after each backward (fp32: nothing to do)."""
        if self.masters is self.params:
            return
        for i, p in enumerate(self.params):
            if p.grad is not None:
                grad = p.grad.to(self.grad_accum_dtype)
                self.accumulated[i] = grad if self.accumulated[i] is None else self.accumulated[i].add_(grad)
                p.grad = None

    def grads(self, order=None) -> list[torch.Tensor]:
        """The accumulated gradients, in parameter order or in `order` (indices)."""
        held = [p.grad for p in self.params] if self.masters is self.params else self.accumulated
        return [held[i] for i in (order or range(len(held))) if held[i] is not None]

    def nonfinite_cause(self, losses: list[torch.Tensor]) -> str | None:
        return local_cause(losses, self.grads())

    # ---- as block_local_stage.StageCompute: the stage's own verdict, norm and update ----------
    def reduce_grads(self, losses: list[torch.Tensor]) -> str | None:
        """The launched ReduceGrads: the stage's non-finite verdict, then the all-reduce."""
        cause = self.nonfinite_cause(losses)
        if not cause:
            self.all_reduce_grads()
        return cause

    def optimizer_step(self, cause: str | None, tracked: bool = False) -> tuple[str | None, float | None]:
        """Skip a non-finite step, or clip by this stage's own norm and step."""
        if cause:
            self.skip_step()
            return cause, None
        norm = self.grad_square_norm().sqrt()
        self.clip_and_step(norm)
        return None, float(norm)

    def master_weights(self) -> list[torch.Tensor]:
        return self.masters

    # ---- the parts, which backprop runs with one verdict and one norm for every stage ----------
    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """The all-reduce over this stage's one replica changes no value, but DeepSpeed casts the
        accumulated gradients to its communication dtype and back (bf16: a rounding when they
        accumulate in fp32)."""
        if self.masters is self.params or self.communication_dtype == self.grad_accum_dtype:
            return
        for g in self.grads():
            g.copy_(g.to(self.communication_dtype))

    def grad_square_norm(self) -> torch.Tensor:
        """Sum of the squared per-parameter gradient norms, in DeepSpeed's order (norm_order), as
        it adds them up before its model-parallel all-reduce."""
        grads = self.grads(self.norm_order)
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.stack([g.detach().float().norm(2) for g in grads]).pow(2).sum().float()

    def clip_and_step(self, norm: torch.Tensor) -> None:
        """Clip with `norm` (this stage's own, or the global one for backprop), step, advance the
        schedule. DeepSpeed's fp32 clip, to the rounding: grads *= min(1, max_norm / (norm + 1e-6))."""
        if self.clip > 0:
            coefficient = torch.minimum(torch.tensor([1.0], device=norm.device),
                                        torch.tensor([self.clip], device=norm.device) / (norm + 1e-6))
            torch._foreach_mul_(self.grads(), coefficient.squeeze(0))
        if self.masters is not self.params:
            # DeepSpeed's flat gradient buffer: a parameter without a gradient steps on zeros.
            for m, g in zip(self.masters, self.accumulated):
                m.grad = torch.zeros_like(m) if g is None else g.float()
        self.optimizer.step()
        if self.masters is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        self._clear_grads()
        self._advance_schedule()

    def skip_step(self) -> None:
        """A non-finite step: no update, no optimizer-state change, the schedule goes on."""
        self._clear_grads()
        self._advance_schedule()
        self.skipped_steps += 1

    def _clear_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
        self.accumulated = [None] * len(self.params)

    def _advance_schedule(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "masters": None if self.masters is self.params else [m.detach().cpu() for m in self.masters],
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["masters"] is not None:
            with torch.no_grad():
                for m, saved in zip(self.masters, state["masters"]):
                    m.copy_(saved)
        self.skipped_steps = state["skipped_steps"]
