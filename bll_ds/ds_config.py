"""Load a DeepSpeed JSON config and check it against the launch before DeepSpeed sees it.

DeepSpeed's own checks are asserts deep inside engine construction, on every rank; here the same
rules give one line naming the fix. The returned dict is what DeepSpeed gets, with the three
batch sizes resolved and the scheduler's length set from --steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bll_ds.errors import UserError

DEFAULT_STEPS = 1000


@dataclass
class DsSettings:
    config: dict          # passed to DeepSpeed unchanged apart from the resolved fields
    data_parallel: int    # replicas per stage
    micro_batch_size: int  # sequences per micro-batch per replica
    micro_batches: int    # micro-batches per optimizer step (gradient accumulation steps)
    steps: int

    @property
    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.data_parallel

    @property
    def bf16(self) -> bool:
        return bool(self.config.get("bf16", {}).get("enabled", False))


def load_ds_config(path: str, world_size: int, stages: int, steps: int | None) -> DsSettings:
    cfg = _read_json(path)
    if world_size % stages:
        raise UserError(f"{world_size} ranks cannot be split into {stages} pipeline stages.",
                        f"launch a multiple of {stages} ranks (deepspeed --num_gpus {stages * max(1, world_size // stages)}) "
                        f"or change --stages.")
    dp = world_size // stages
    mbs, gas = _resolve_batch_sizes(cfg, dp, path)
    cfg["train_micro_batch_size_per_gpu"] = mbs
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = mbs * gas * dp

    zero_stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if zero_stage > 1:
        raise UserError(f"{path} asks for ZeRO stage {zero_stage}; DeepSpeed's pipeline engine supports 0 and 1.",
                        "set zero_optimization.stage to 1 (optimizer state sharded across data-parallel replicas).")

    scheduler_params = cfg.get("scheduler", {}).get("params", {})
    if steps is None:
        steps = scheduler_params.get("total_num_steps", DEFAULT_STEPS)
    if steps < 1:
        raise UserError(f"--steps {steps} is not a positive number of optimizer steps.", "pass --steps K with K >= 1.")
    if "total_num_steps" in scheduler_params:
        scheduler_params["total_num_steps"] = steps
    bf16 = cfg.get("bf16")
    if isinstance(bf16, dict) and bf16.get("enabled") == "auto":
        bf16["enabled"] = native_bf16()
    # The trainer prints its own progress; DeepSpeed's per-step prints would interleave with it.
    cfg.setdefault("steps_per_print", 10**9)
    return DsSettings(config=cfg, data_parallel=dp, micro_batch_size=mbs, micro_batches=gas, steps=steps)


def native_bf16() -> bool:
    """What `"bf16": {"enabled": "auto"}` resolves to: bf16 where the hardware multiplies bf16
    matrices natively and faster than fp32 -- CUDA GPUs of compute capability 8.0 or newer, CPUs
    with AMX tiles. A CPU with only AVX512-BF16 runs bf16 matrix products at about half its fp32
    rate (83 against 157 GFLOP/s on this project's CI machine; docs/BENCHMARKS.md), so "auto"
    keeps fp32 there; set "enabled": true to force bf16 anyway.
    """
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability()[0] >= 8
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def _read_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist.",
                        "pass --deepspeed_config ds_configs/<name>.json.")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path} is not valid JSON ({err}).", "fix the file.") from None


def _resolve_batch_sizes(cfg: dict, dp: int, path: str) -> tuple[int, int]:
    """DeepSpeed's rule: train_batch_size = micro_batch_size x grad_accum_steps x dp; any two fix the third."""
    tbs = cfg.get("train_batch_size")
    mbs = cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps")
    for name, value in (("train_batch_size", tbs), ("train_micro_batch_size_per_gpu", mbs),
                        ("gradient_accumulation_steps", gas)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"{path}: {name} = {value!r} is not a positive integer.", f"set {name} to an integer >= 1.")
    if mbs is not None and gas is not None:
        if tbs is not None and tbs != mbs * gas * dp:
            raise UserError(
                f"{path}: train_batch_size {tbs} != micro-batch {mbs} x accumulation {gas} x {dp} data-parallel replicas.",
                f"set train_batch_size to {mbs * gas * dp}, or drop it and let it follow from the other two.")
        return mbs, gas
    if tbs is None or (mbs is None and gas is None):
        raise UserError(f"{path} does not fix the batch size.",
                        "give two of train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps.")
    known, unknown = (mbs, "gradient_accumulation_steps") if mbs is not None else (gas, "train_micro_batch_size_per_gpu")
    if tbs % (known * dp):
        raise UserError(
            f"{path}: train_batch_size {tbs} is not divisible by {known} x {dp} data-parallel replicas, "
            f"so {unknown} would not be a whole number.",
            f"make train_batch_size a multiple of {known * dp}, or change the replica count.")
    other = tbs // (known * dp)
    return (mbs, other) if mbs is not None else (other, gas)
