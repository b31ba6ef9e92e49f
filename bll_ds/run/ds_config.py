"""Load a DeepSpeed JSON config and check it against the launch before DeepSpeed sees it.

DeepSpeed's own checks are asserts deep inside engine construction, on every rank; here the same
rules give one line naming the fix. The returned dict is what DeepSpeed gets, with the three
batch sizes resolved and the scheduler's length set from --steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bll_ds.infra.errors import UserError
from bll_ds.run.ds_config_keys import check_keys

DEFAULT_STEPS = 1000


@dataclass
class DsSettings:
    config: dict          # passed to DeepSpeed unchanged apart from the resolved fields
    data_parallel: int    # replicas per stage
    micro_batch_size: int  # sequences per micro-batch per replica
    micro_batches: int    # micro-batches per optimizer step (gradient accumulation steps)
    steps: int
    bf16_auto_peaks: dict | None = None  # the measurement that decided "auto" (GFLOP/s), if one did

    @property
    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.micro_batches * self.data_parallel

    @property
    def bf16(self) -> bool:
        enabled = self.config.get("bf16", {}).get("enabled", False)
        if enabled == "auto":
            raise RuntimeError('bf16 "auto" is still unresolved: call resolve_bf16_auto first')
        return bool(enabled)

    @property
    def grad_accum_dtype(self):
        """The torch dtype DeepSpeed's optimizer accumulates gradients in: the config's
        data_types.grad_accum_dtype, else the model's. So bf16 without ZeRO accumulates in bf16
        (DeepSpeed's pipeline allows nothing else there); ZeRO-1 with "fp32" accumulates in fp32."""
        import torch
        from deepspeed.runtime.config import DtypeEnum

        given = self.config.get("data_types", {}).get("grad_accum_dtype")
        if given is not None:
            return DtypeEnum(given).value
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def communication_dtype(self):
        """The torch dtype DeepSpeed all-reduces gradients in: the config's
        communication_data_type, else bf16 in bf16 runs. Accumulated fp32 gradients are rounded
        to it once per step, even with a single replica."""
        import torch
        from deepspeed.runtime.config import get_communication_data_type

        given = get_communication_data_type(self.config)
        return given if given is not None else torch.bfloat16 if self.bf16 else torch.float32

    @property
    def bf16_auto(self) -> bool:
        """The config says "auto" and nothing has decided it yet."""
        return self.config.get("bf16", {}).get("enabled") == "auto"

    def resolve_bf16_auto(self, choice: bool, peaks: dict | None = None) -> None:
        """Fix "auto" to `choice`. `peaks`, the measurement behind it, is kept beside the config
        (DeepSpeed refuses unknown keys in its bf16 section); the run dir's saved copy has it."""
        self.config["bf16"]["enabled"] = bool(choice)
        self.bf16_auto_peaks = peaks


def load_ds_config(path: str, world_size: int, stages: int, steps: int | None,
                   defer_bf16_auto: bool = False, overrides: list[str] = ()) -> DsSettings:
    """overrides: --ds_set's KEY.PATH=VALUE items, applied in order over the file's values and
    checked with them. defer_bf16_auto: leave `"bf16": {"enabled": "auto"}` for the caller to decide once for all
    ranks (training measures on rank 0 and broadcasts: ranks that chose differently would send
    each other activations of different dtypes). Otherwise it is measured here, in this process."""
    cfg = _read_json(path)
    # A run dir's saved ds_config.json records what decided bf16 "auto"; as an input it is a record only.
    cfg.pop("bf16_auto_measured_gflops", None)
    for item in overrides:
        _set_value(cfg, item)
    # Errors name where a value came from.
    where = f"{path} with --ds_set {' '.join(overrides)}" if overrides else path
    if "model_type" in cfg:
        raise UserError(f"{path} is a model spec (it has a model_type), not a DeepSpeed config.",
                        "pass it as --model, and a DeepSpeed JSON (ds_configs/*.json) as --deepspeed_config.")
    check_keys(cfg, where)
    if world_size % stages:
        raise UserError(f"{world_size} ranks cannot be split into {stages} pipeline stages.",
                        f"launch a multiple of {stages} ranks (deepspeed --num_gpus {stages * max(1, world_size // stages)}) "
                        f"or change --stages.")
    dp = world_size // stages
    mbs, gas = _resolve_batch_sizes(cfg, dp, where)
    cfg["train_micro_batch_size_per_gpu"] = mbs
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = mbs * gas * dp

    zero_stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if zero_stage > 1:
        raise UserError(f"{where} asks for ZeRO stage {zero_stage}; DeepSpeed's pipeline engine supports 0 and 1.",
                        "set zero_optimization.stage to 1 (optimizer state sharded across data-parallel replicas).")

    _check_grad_accum_dtype(cfg, zero_stage, where)

    scheduler_params = cfg.get("scheduler", {}).get("params", {})
    if steps is None:
        steps = scheduler_params.get("total_num_steps", DEFAULT_STEPS)
    if steps < 1:
        raise UserError(f"--steps {steps} is not a positive number of optimizer steps.", "pass --steps K with K >= 1.")
    if "total_num_steps" in scheduler_params:
        scheduler_params["total_num_steps"] = steps
    # The trainer prints its own progress; DeepSpeed's per-step prints would interleave with it.
    cfg.setdefault("steps_per_print", 10**9)
    ds = DsSettings(config=cfg, data_parallel=dp, micro_batch_size=mbs, micro_batches=gas, steps=steps)
    if ds.bf16_auto and not defer_bf16_auto:
        ds.resolve_bf16_auto(*bf16_pays_off(None))
    return ds


def _set_value(cfg: dict, item: str) -> None:
    """One --ds_set KEY.PATH=VALUE: the value is JSON where it parses (3e-4, true, [0.9, 0.95]),
    else a string; missing sections are created."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError(f"--ds_set {item}: expected KEY.PATH=VALUE.",
                        "write it like --ds_set optimizer.params.lr=3e-4.")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    *parents, leaf = key.split(".")
    node = cfg
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[:depth + 1])
            raise UserError(f"--ds_set {item}: {where} is {node!r} in the DeepSpeed config, not a section.",
                            f"set {where} itself, or check the key's path.")
    node[leaf] = value


BF16_MIN_SPEEDUP = 1.1  # bf16 costs precision; a tie with fp32 keeps fp32


def bf16_pays_off(device, cache_dir: str | None = None) -> tuple[bool, dict]:
    """What `"bf16": {"enabled": "auto"}` resolves to, and the measurement behind it: bf16 where
    this device multiplies bf16 matrices at least BF16_MIN_SPEEDUP times faster than fp32, as
    measured here (bll_ds/measure/matmul_peak.py, under a second). CPU flags do not tell: an AMD
    EPYC with AVX512-BF16 and no AMX runs bf16 products 2.4x faster than fp32 (206 against 87
    GFLOP/s per core), an Intel CPU with AVX512-BF16 but no AMX about half as fast (83 against
    157), an AVX2-only CPU 5-20x slower; any CUDA GPU of compute capability 8.0+ far faster.
    Set "enabled": true or false to decide without measuring.

    cache_dir: the measurement is kept there per device, thread count and torch version, so that
    only a machine's first run spends start-up on it (bll_ds/measure/matmul_peak.py).
    """
    import torch

    from bll_ds.measure.matmul_peak import cached_matmul_peaks

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return False, {}
    peaks = cached_matmul_peaks(device, cache_dir)
    return peaks["bf16"] >= BF16_MIN_SPEEDUP * peaks["fp32"], peaks


def _check_grad_accum_dtype(cfg: dict, zero_stage: int, path: str) -> None:
    """DeepSpeed asserts these deep inside engine construction, on every rank."""
    given = cfg.get("data_types", {}).get("grad_accum_dtype")
    if given is None:
        return
    from deepspeed.runtime.config import DtypeEnum

    try:
        accum = DtypeEnum(given).name
    except ValueError:
        raise UserError(f"{path}: data_types.grad_accum_dtype {given!r} is not a dtype DeepSpeed knows.",
                        'use "fp32" or "bf16".') from None
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    if zero_stage == 0 and bf16 and accum != "bf16":
        raise UserError(f"{path}: bf16 without ZeRO accumulates gradients in bf16 in DeepSpeed's pipeline engine; "
                        f"it cannot accumulate them in {given}.",
                        'set zero_optimization.stage to 1 (fp32 accumulation, DeepSpeed\'s BF16_Optimizer), '
                        "or drop data_types.grad_accum_dtype.")


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
