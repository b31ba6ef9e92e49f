"""The largest micro-batch each method fits in a fixed memory budget per stage, from the memory
planner (bll_bench/memory.py), with and without activation checkpointing.

    python -m bll_bench.memory_budget --model models/llama-7b.json --stages 8 --seq_len 2048 \
        --budget_gib 80 --dtype bf16 [--variant SPEC (default: the default variant)] [--json FILE]

A 1F1B stage keeps up to S - k micro-batches' activations alive (stage 0 the most), a block-local
stage one (plus its readout); checkpointing every decoder layer cuts both to the layer inputs
and one layer's recompute. The question a user with fixed GPUs asks is which micro-batch each
fits: the larger one runs the same tokens per step in fewer, bigger matrix products. The budget
is what the planner's peak may use: --budget_gib less the same headroom and runtime overhead as
the cluster table (`GpuBudget`: 10% and 3 GiB on 80 GiB GPUs), or exactly --budget_gib with
--no-overheads (a CPU budget, where the runtime's own RSS is measured separately).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bll_bench.memory import GIB, GpuBudget, max_stage_bytes, modelled_spec, plan
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.modeling import load_model_spec

ARMS = (("bp", 0), ("bp", 1), ("bll", 0), ("bll", 1))  # (method, activation_checkpoint_interval)


@dataclass
class Fit:
    method: str
    activation_checkpoint_interval: int
    micro_batch_size: int    # the largest that fits (0: not even one sequence)
    worst_stage_gib: float   # the planner's worst stage at that micro-batch size
    next_gib: float          # ... and at one more sequence, which does not fit


def largest_micro_batch(spec, stages: int, method: str, budget_bytes: int, seq_len: int,
                        micro_batches: int, *, limit: int = 4096, **plan_kwargs) -> Fit:
    """Binary search over the micro-batch size: the planner's peak grows with it."""
    @functools.cache
    def worst(b: int) -> int:
        return max_stage_bytes(plan(spec, stages, 1, b, seq_len, micro_batches, method=method, **plan_kwargs))

    ckpt = plan_kwargs.get("activation_checkpoint_interval", 0)
    if worst(1) > budget_bytes:
        return Fit(method, ckpt, 0, 0.0, round(worst(1) / GIB, 3))
    low, high = 1, 2
    while high <= limit and worst(high) <= budget_bytes:
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if worst(mid) <= budget_bytes else (low, mid)
    return Fit(method, ckpt, low, round(worst(low) / GIB, 3), round(worst(low + 1) / GIB, 3))


def fits(spec, stages: int, budget_bytes: int, seq_len: int, micro_batches: int, variant: str,
         vocab_size: int | None = None, **plan_kwargs) -> list[Fit]:
    config = load_model_spec(spec, vocab_size)  # once: the search plans each arm many times
    return [largest_micro_batch(config, stages, method, budget_bytes, seq_len, micro_batches,
                                activation_checkpoint_interval=ckpt,
                                **({"variant": variant} if method == "bll" else {}), **plan_kwargs)
            for method, ckpt in ARMS]


def markdown(rows: list[Fit], budget_gib: float) -> str:
    lines = [f"| method | activation checkpointing | largest micro-batch | worst stage GiB | with one more "
             f"(> {budget_gib:g} GiB usable) |", "| --- | --- | --- | --- | --- |"]
    for f in rows:
        lines.append(f"| {f.method.upper()} | {'every layer' if f.activation_checkpoint_interval else 'off'} | "
                     f"**{f.micro_batch_size}** | {f.worst_stage_gib} | {f.next_gib} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bll_bench.memory_budget", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model spec (HF config JSON), e.g. models/llama-7b.json")
    p.add_argument("--stages", type=int, required=True, help="pipeline stages S")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro_batches", type=int, default=None,
                   help="micro-batches M per optimizer step (default: 4 x stages)")
    p.add_argument("--budget_gib", type=float, required=True, help="memory per stage (one GPU, or a CPU budget)")
    p.add_argument("--overheads", action=argparse.BooleanOptionalAction, default=True,
                   help="subtract the cluster table's headroom (10%%) and runtime overhead (3 GiB)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights' and activations' dtype")
    p.add_argument("--zero", type=int, choices=(0, 1), default=1, help="DeepSpeed ZeRO stage")
    p.add_argument("--variant", type=modelled_spec, default=DEFAULT_VARIANT,
                   help="the BLL arms' variant with its options")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="vocabulary size in place of the spec's (default: the spec's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    budget = GpuBudget(int(a.budget_gib * GIB)).usable_bytes if a.overheads else int(a.budget_gib * GIB)
    rows = fits(a.model, a.stages, budget, a.seq_len, a.micro_batches or 4 * a.stages, a.variant,
                dtype=a.dtype, zero_stage=a.zero, vocab_size=a.vocab_size)
    print(f"{a.model}, S = {a.stages}, T = {a.seq_len}, M = {a.micro_batches or 4 * a.stages}, {a.dtype}, "
          f"ZeRO-{a.zero}, BLL variant {a.variant}; usable per stage {budget / GIB:.2f} GiB\n")
    print(markdown(rows, budget / GIB))
    if a.json:
        a.json.write_text(json.dumps([asdict(f) for f in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
