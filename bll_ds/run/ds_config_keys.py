"""The keys and values of a DeepSpeed config, checked before any rank starts.

DeepSpeed ignores a top-level key it does not know, so a misspelt "gradient_cliping" turns
clipping off without a word, and it passes the optimizer's and scheduler's params to their
constructors, so a misspelt one is a TypeError on every rank, and a negative learning rate a
ValueError deep in torch. Here each is one line naming the key and the closest known one.

Top-level keys: DeepSpeed's documented sections (DEEPSPEED_KEYS; the trainer writes the csv_monitor
and wandb sections itself). The optimizer's params are checked for the types the trainer builds
(Adam, AdamW: the emulator builds torch's, the launched engine DeepSpeed's), the scheduler's
against the signature of DeepSpeed's scheduler class. Sections that DeepSpeed validates itself
with one clear message (zero_optimization, bf16, ...) are left to it.
"""

from __future__ import annotations

import difflib
import inspect
import numbers

from bll_ds.infra.errors import UserError

# DeepSpeed 0.19's top-level config keys (deepspeed/runtime/config.py and the sections it reads).
DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
    "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity",
    "aio", "data_types", "data_efficiency", "curriculum_learning", "compression_training", "checkpoint",
    "pipeline", "sparse_attention", "disable_allgather", "dataloader_drop_last", "eigenvalue",
    "progressive_layer_drop", "quantize_training", "nebula", "hybrid_engine", "compile", "timers",
    "weight_quantization", "use_data_before_expert_parallelism", "tensor_parallel", "graph_harvesting",
    "use_node_local_storage", "load_universal_checkpoint", "fp16_master_weights_and_grads",
    "bf16_master_weights_and_grads", "gradient_allreduce_op", "zero_quantized_weights",
    "zero_quantized_nontrainable_weights", "zero_quantized_gradients", "mics_shard_size",
    "mics_hierarchical_params_gather", "disable_python_gc", "domino",
})

ADAM_PARAMS = frozenset({"lr", "betas", "eps", "weight_decay", "torch_adam", "adam_w_mode", "amsgrad",
                         "bias_correction", "fused", "foreach", "capturable", "maximize", "differentiable"})
OPTIMIZERS = {"adam": ADAM_PARAMS, "adamw": ADAM_PARAMS}


def _unknown(path: str, where: str, key: str, known) -> UserError:
    """`where`: the section holding the key ("" for the top level)."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f"rename it to {close[0]!r}" if close else f"use one of {sorted(known)}"
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    holder = where or "a DeepSpeed config"
    return UserError(f"{path}: {key!r} is not a key of {holder}{guess}.", f"{hint}, or remove it.")


def _number(path: str, name: str, value, low: float, strict: bool) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise UserError(f"{path}: {name} = {value!r} is not a number {'>' if strict else '>='} {low:g}.",
                        f"set {name} to a number {'above' if strict else 'of at least'} {low:g}.")


def check_keys(cfg: dict, path: str) -> None:
    """Raise UserError for a key DeepSpeed does not know or a value it would fail on late."""
    for key in cfg:
        if key not in DEEPSPEED_KEYS:
            raise _unknown(path, "", key, DEEPSPEED_KEYS)
    if "gradient_clipping" in cfg:
        _number(path, "gradient_clipping", cfg["gradient_clipping"], 0, strict=False)
    _check_optimizer(cfg.get("optimizer"), path)
    _check_scheduler(cfg.get("scheduler"), path)


def _check_optimizer(section, path: str) -> None:
    if section is None:
        return
    kind = str(section.get("type", "")).lower()
    params = section.get("params", {})
    allowed = OPTIMIZERS.get(kind)
    if allowed is None:
        return  # the trainer's optimizer builders name what they support (emulated_stage.build_optimizer)
    for key in params:
        if key not in allowed:
            raise _unknown(path, f"optimizer.params ({section.get('type')})", key, allowed)
    if "lr" in params:
        _number(path, "optimizer.params.lr", params["lr"], 0, strict=False)  # 0: frozen, as some tests want
    if "weight_decay" in params:
        _number(path, "optimizer.params.weight_decay", params["weight_decay"], 0, strict=False)
    if "eps" in params:
        _number(path, "optimizer.params.eps", params["eps"], 0, strict=True)
    betas = params.get("betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) == 2
                                  and all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas)):
        raise UserError(f"{path}: optimizer.params.betas = {betas!r} is not two numbers in [0, 1).",
                        "set betas to [beta1, beta2], e.g. [0.9, 0.95].")


def _check_scheduler(section, path: str) -> None:
    if section is None:
        return
    from deepspeed.runtime import lr_schedules

    kind = section.get("type")
    if kind not in lr_schedules.VALID_LR_SCHEDULES:
        raise UserError(f"{path}: scheduler.type {kind!r} is not a DeepSpeed learning-rate schedule.",
                        f"use one of {sorted(lr_schedules.VALID_LR_SCHEDULES)}.")
    signature = inspect.signature(getattr(lr_schedules, kind).__init__).parameters
    allowed = set(signature) - {"self", "optimizer", "last_batch_iteration"}
    params = section.get("params", {})
    for key, value in params.items():
        if key not in allowed:
            raise _unknown(path, f"scheduler.params ({kind})", key, allowed)
        if key.endswith(("_lr", "_ratio")) and key != "warmup_type":
            _number(path, f"scheduler.params.{key}", value, 0, strict=key.endswith("max_lr"))
        elif key.endswith(("num_steps", "step_size")):
            _number(path, f"scheduler.params.{key}", value, 0, strict=False)
