"""Scale rehearsal: ONE real pipeline stage of a big model, trained block-locally on this CPU,
measured next to the memory planner's prediction for the same stage.

    python scripts/rehearse_stage.py --model models/llama-1b.json --stages 8 --json rehearsal.json

The stage is built as the pipeline builds it: its decoder layers (and the embedding on stage 0,
the head on the last stage) from `layer_specs`, each seeded like `build_sequential`, plus its
feedback block seeded and attached as `build_engine` does it. No process group: the upstream
stage's activations are random [b, T, H] tensors "received" into a DeepSpeed-style receive
buffer, the downstream stage's target table is a random [V, H] table, and targets are random
token ids. What the BLL engine keeps between micro-batches and steps is kept here too, so that
the planner's whole-stage prediction applies: the receive buffer, the send window of detached
outputs at its worst case (2M, what the planner counts: the engine releases completed sends at
the next send, but a slow receiver fills the window), the inbox queue of received tables
(LAG + 1) and the outbox of published payloads.

The step itself is the engine's: bll_ds/pipeline/block_local_stage.py's `BlockLocalStage` (begin
with the table; per micro-batch, after the forward, `local_backward`, sliced where the engine
slices; then the STEP_END operations in their order: the feedback update, the gradient
reduction (nothing to reduce at DP = 1), clipping and the optimizer step, and the table
published upstream). The rehearsal supplies its own compute (RehearsalCompute: plain autograd
scaled by 1/M, as DeepSpeed's backward scales it) and transport (RehearsalTransport: random
tables in, payloads kept).

Optimizer: fp32 runs use torch AdamW (the planner's "fp32, ZeRO-0" row); bf16 runs keep fp32
master weights, an fp32 gradient-accumulation buffer and fp32 moments next to bf16 weights and
gradients, which is DeepSpeed's BF16_Optimizer at DP = 1 (the planner's "bf16, ZeRO-1" row).

Measurements: median step time; peak RSS (ru_maxrss) against the RSS before the stage was built
plus the planner's peak bytes; the saved-activation peak of one micro-batch (tables excluded)
against the planner's `saved_per_micro_batch`, and of a whole step as the engines' meter sees it
(only weights excluded) against `meter_bytes`. By default glibc is told to mmap every allocation
above 64 KiB (mallopt M_MMAP_THRESHOLD), so that freed activations leave the RSS at once and the
peak RSS tracks live bytes; with glibc's default (--malloc_mmap_threshold 0) RSS also holds freed
heap chunks, 1.3-2x the live activations in our measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from bll_bench import memory
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.measure.rss import peak_rss_mb
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.method.stage_step import StageStep, run_step_end
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling import lm_loss, load_model_spec
from bll_ds.pipeline.block_local_stage import BlockLocalStage
from bll_ds.pipeline.build import Stage, build_stage, forward_layers, weight_decay_groups
from bll_ds.pipeline.trace import SavedActivationMeter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter number


class MasterWeightAdamW:
    """bf16 weights and gradients with fp32 master weights, an fp32 gradient-accumulation buffer
    and fp32 Adam moments: the memory of DeepSpeed's BF16_Optimizer at DP = 1."""

    def __init__(self, groups: list[dict], **adam_kwargs):
        self.pairs = []
        master_groups = []
        for group in groups:
            masters = []
            for param in group["params"]:
                master = param.detach().float().clone().requires_grad_(True)
                master.grad = torch.zeros_like(master)
                self.pairs.append((param, master))
                masters.append(master)
            master_groups.append({**group, "params": masters})
        self.adam = torch.optim.AdamW(master_groups, **adam_kwargs)

    @torch.no_grad()
    def accumulate(self) -> None:
        """After each backward, as DeepSpeed's backward epilogue: bf16 grads into the fp32 buffer."""
        for param, master in self.pairs:
            if param.grad is not None:
                master.grad.add_(param.grad)
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.accumulate()
        self.adam.step()
        for param, master in self.pairs:
            param.copy_(master)
            master.grad.zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param, _ in self.pairs:
            param.grad = None


class PlainAdamW(torch.optim.AdamW):
    def accumulate(self) -> None:
        """fp32: gradients accumulate in param.grad."""


@dataclass
class EngineHoldings:
    """Stand-ins for what BLLPipelineEngine keeps alive between micro-batches and steps."""
    receive_buffer: torch.Tensor | None                         # DeepSpeed's pipe_recv_buf
    send_window: deque = field(default_factory=deque)          # detached outputs of in-flight isends (worst case)
    inbox: deque = field(default_factory=deque)                # received tables, oldest first
    outbox: deque = field(default_factory=deque)               # published payloads not yet seen sent


@dataclass
class RehearsalResult:
    model: str
    stages: int
    stage: int
    decoder_layers: int
    params: int
    micro_batch_size: int
    seq_len: int
    micro_batches: int
    steps: int
    readout_max_logits_mb: float
    readout_slices: int             # the local readout's sequence slices (1 on the last stage)
    dtype: str
    threads: int
    malloc_mmap_threshold: int
    step_s: list[float]
    median_step_s: float
    baseline_rss_mb: float          # before the stage was built
    peak_rss_mb: float
    predicted_rss_mb: float         # baseline + planner peak
    saved_micro_batch_bytes: int    # measured, one micro-batch, weights and tables excluded
    predicted_saved_micro_batch_bytes: int
    saved_step_bytes: int | None    # measured over a whole step, weights excluded (the engines' meter)
    predicted_meter_bytes: int
    plan: dict                      # the planner's StageMemory for this stage
    losses: list[float]

    def comparison_rows(self) -> list[tuple[str, float, float]]:
        rows = [("peak RSS (MB)", self.peak_rss_mb, self.predicted_rss_mb),
                ("saved, one micro-batch (MB)", self.saved_micro_batch_bytes / memory.MIB,
                 self.predicted_saved_micro_batch_bytes / memory.MIB)]
        if self.saved_step_bytes is not None:
            rows.append(("saved, whole step (MB)", self.saved_step_bytes / memory.MIB,
                         self.predicted_meter_bytes / memory.MIB))
        return rows


def rehearse(model: str = "models/llama-1b.json", stages: int = 8, stage: int | None = None,
             micro_batch_size: int = 1, seq_len: int = 512, micro_batches: int = 2, steps: int = 3,
             dtype: str = "fp32", threads: int = 1, seed: int = 0, variant: str = "prototype",
             malloc_mmap_threshold: int = 65536,
             readout_max_logits_mb: float = memory.READOUT_MAX_LOGITS_MB) -> RehearsalResult:
    """Train stage `stage` (default: the middle one) of an S-stage pipeline for `steps` steps and
    measure it against memory.plan (DP 1; fp32 as ZeRO-0 torch AdamW, bf16 as BF16_Optimizer).
    readout_max_logits_mb: as --bll_readout_max_logits_mb, for the engine's sliced readout and
    the planner alike.
    Step 0 is metered as the engines meter it (weights excluded), step 1 per micro-batch with the
    tables excluded too; every step is timed."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    torch.set_num_threads(threads)
    if malloc_mmap_threshold:
        _set_mmap_threshold(malloc_mmap_threshold)
    config = load_model_spec(model)
    stage = (stages - 1) // 2 if stage is None else stage
    torch_dtype = DTYPES[dtype]
    baseline_rss = peak_rss_mb()

    built = build_stage(config, stages, stage, seed, variant)
    built.module.to(torch_dtype)   # DeepSpeed casts the whole stage module, feedback included
    built.module.train()
    optimizer = _optimizer(built, dtype)
    holdings = _holdings(config, built, micro_batch_size, seq_len, torch_dtype)
    generator = torch.Generator().manual_seed(seed)
    block_stage = _block_stage(config, built, optimizer, holdings, micro_batches, torch_dtype, readout_max_logits_mb)

    step_times, losses = [], []
    saved_step = saved_micro_batch = None
    for index in range(steps):
        # Step 0 is metered as the engines meter it; step 1 per micro-batch, tables excluded.
        meter_mode = "step" if index == 0 and steps > 1 else "micro_batch" if index <= 1 else None
        start = time.perf_counter()
        loss, peak = _train_step(config, built, block_stage, index + 1, holdings, micro_batch_size, seq_len,
                                 micro_batches, generator, meter_mode)
        step_times.append(time.perf_counter() - start)
        losses.append(loss)
        if meter_mode == "step":
            saved_step = peak
        elif meter_mode == "micro_batch":
            saved_micro_batch = peak

    stage_plan = memory.plan(config, stages, 1, micro_batch_size, seq_len, micro_batches, dtype,
                             zero_stage=0 if dtype == "fp32" else 1, method="bll", variant=variant,
                             readout_max_logits_mb=readout_max_logits_mb)[stage]
    return RehearsalResult(
        model=model, stages=stages, stage=stage, decoder_layers=built.decoder_layers,
        params=sum(p.numel() for p in built.module.parameters() if p.requires_grad),
        micro_batch_size=micro_batch_size, seq_len=seq_len, micro_batches=micro_batches, steps=steps,
        readout_max_logits_mb=readout_max_logits_mb,
        readout_slices=block_stage.stage_step.readout_slices((micro_batch_size, seq_len)),
        dtype=dtype, threads=threads, malloc_mmap_threshold=malloc_mmap_threshold,
        step_s=[round(t, 4) for t in step_times], median_step_s=round(statistics.median(step_times), 4),
        baseline_rss_mb=round(baseline_rss, 1), peak_rss_mb=round(peak_rss_mb(), 1),
        predicted_rss_mb=round(baseline_rss + stage_plan.peak_bytes / memory.MIB, 1),
        saved_micro_batch_bytes=saved_micro_batch, predicted_saved_micro_batch_bytes=stage_plan.saved_per_micro_batch,
        saved_step_bytes=saved_step, predicted_meter_bytes=stage_plan.meter_bytes,
        plan=stage_plan.as_dict(), losses=[round(v, 4) for v in losses])


def _set_mmap_threshold(n_bytes: int) -> None:
    """Serve every allocation above n_bytes by mmap, returned to the OS on free (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, n_bytes)
    except OSError:
        print("rehearse: not glibc; RSS includes the allocator's cached heap", file=sys.stderr)


def _optimizer(built: Stage, dtype: str):
    groups = weight_decay_groups(built.module)
    kwargs = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # ds_configs/llama-25m.json
    return PlainAdamW(groups, **kwargs) if dtype == "fp32" else MasterWeightAdamW(groups, **kwargs)


def _holdings(config, built: Stage, micro_batch_size: int, seq_len: int, dtype) -> EngineHoldings:
    receive = None if built.first else torch.empty(micro_batch_size, seq_len, config.hidden_size, dtype=dtype)
    holdings = EngineHoldings(receive_buffer=receive)
    if built.sends_tables and not built.last:
        for _ in range(memory.INBOX_TABLES):
            holdings.inbox.append(_random_message(config, built.variant, dtype))
    return holdings


def _random_message(config, spec: str, dtype) -> torch.Tensor:
    """Stands in for a message received from the downstream stage (a target table: rows like an
    LM head's; entries of a sent layer on the same scale)."""
    variant = get_variant(spec)
    return (torch.randn(variant.message_shape(config)) * config.initializer_range).to(variant.message_dtype(dtype))


class RehearsalCompute:
    """The rehearsal's numerics for BlockLocalStage: plain autograd scaled as DeepSpeed's backward
    scales it, the optimizer's gradient accumulation, nothing to reduce (DP = 1, no non-finite
    verdict: the rehearsal measures memory and time), a clip by the stage's own norm and a step."""

    def __init__(self, built: Stage, optimizer, micro_batches: int):
        self.built, self.optimizer, self.micro_batches = built, optimizer, micro_batches

    def begin_step(self, step: int) -> None:
        """Nothing to seed: the rehearsal's inputs come from its own generator."""

    def backward(self, loss: torch.Tensor, scale_by_micro_batches: bool) -> None:
        """DeepSpeedEngine.backward: divides by the accumulation steps when asked; bf16's
        gradients go into the fp32 accumulation buffer after each backward."""
        (loss / self.micro_batches if scale_by_micro_batches else loss).backward()
        self.optimizer.accumulate()

    def reduce_grads(self, losses: list[torch.Tensor]) -> str | None:
        return None

    def optimizer_step(self, cause: str | None, tracked: bool) -> tuple[str | None, float | None]:
        nn.utils.clip_grad_norm_([p for p in self.built.module.parameters() if p.grad is not None], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None, None

    def master_weights(self) -> list[torch.Tensor]:
        return []

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


class RehearsalTransport:
    """Random messages stand in for the downstream stage's: one arrives after every step (the
    inbox keeps LAG + 1), and this stage's own are kept as TableOutbox keeps its payloads."""

    def __init__(self, config, built: Stage, holdings: EngineHoldings, dtype):
        self.config, self.built, self.holdings, self.dtype = config, built, holdings, dtype
        self.receives = built.sends_tables and not built.last
        self.sends = built.sends_tables and not built.first

    def table_for_step(self, step: int) -> torch.Tensor:
        return self.holdings.inbox[0]

    def arrive(self) -> None:
        if self.receives:
            self.holdings.inbox.popleft()
            self.holdings.inbox.append(_random_message(self.config, self.built.variant, self.dtype))

    def publish(self, table: torch.Tensor, completed_step: int) -> None:
        self.holdings.outbox.append(table.contiguous().clone())
        while len(self.holdings.outbox) > memory.OUTBOX_TABLES:
            self.holdings.outbox.popleft()

    def resume(self, completed_step: int) -> None:
        """A rehearsal is never resumed."""


def _block_stage(config, built: Stage, optimizer, holdings: EngineHoldings, micro_batches: int, dtype,
                 readout_max_logits_mb: float = memory.READOUT_MAX_LOGITS_MB) -> BlockLocalStage:
    """The stage's BlockLocalStage with the rehearsal's compute and transport."""
    layers = [layer for name, layer in built.module.named_children() if name != "bll_feedback"]
    variant = get_variant(built.variant)
    return BlockLocalStage(StageStep(built.feedback, lm_loss, built.last, readout_max_logits_mb, variant), layers, built.last,
                           variant.table_refresh(), RehearsalCompute(built, optimizer, micro_batches),
                           RehearsalTransport(config, built, holdings, dtype))


def _train_step(config, built: Stage, block_stage: BlockLocalStage, step: int, holdings: EngineHoldings,
                micro_batch_size: int, seq_len: int, micro_batches: int, generator,
                meter_mode: str | None) -> tuple[float, int | None]:
    """One optimizer step, as BlockLocalStage runs it. Returns (mean loss, saved-activation peak or None)."""
    block_stage.begin(step)
    upstream = holdings.inbox[0] if block_stage.transport.receives else None
    meter = None
    if meter_mode is not None:
        meter = SavedActivationMeter()
        meter.exclude(built.weights())
        if meter_mode == "micro_batch" and upstream is not None:
            # The received table and what the readout holds for the step (m_k): tables, not part
            # of the per-micro-batch measurement.
            meter.exclude([upstream, *built.feedback.step_tables()])

    with meter.hooks() if meter is not None else contextlib.nullcontext():
        for _ in range(micro_batches):
            outputs, labels, inputs = _forward_micro_batch(config, built, holdings, micro_batch_size, seq_len,
                                                           micro_batches, generator)
            block_stage.local_backward(outputs, labels, inputs)

    operations = block_stage.step_end()
    finish_feedback, publish_table = operations["finish_feedback"], operations["publish_table"]

    def metered_finish_feedback() -> None:
        # The engines meter FinishStep too (bll_ds/pipeline/trace.py SAVES_ACTIVATIONS).
        with meter.hooks() if meter_mode == "step" else contextlib.nullcontext():
            finish_feedback()

    def exchange_tables() -> None:
        block_stage.transport.arrive()
        publish_table()

    run_step_end({**operations, "finish_feedback": metered_finish_feedback, "publish_table": exchange_tables})
    return block_stage.stage_step.mean_loss(), None if meter is None else meter.peak_bytes


def _forward_micro_batch(config, built: Stage, holdings: EngineHoldings, micro_batch_size: int, seq_len: int,
                         micro_batches: int, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets, the (received) input, the stage's forward and the send of its detached output.
    Returns (outputs, labels, inputs)."""
    labels = torch.randint(config.vocab_size, (micro_batch_size, seq_len), generator=generator)
    if built.first:
        inputs = torch.randint(config.vocab_size, (micro_batch_size, seq_len), generator=generator)
    else:
        # "Received" into DeepSpeed's receive buffer, then cloned out of it, as _exec_recv_activations does.
        holdings.receive_buffer.copy_(torch.randn(holdings.receive_buffer.shape, generator=generator))
        inputs = holdings.receive_buffer.clone()
    outputs = forward_layers(built, inputs)
    if not built.last:
        _send(holdings, outputs.detach(), 2 * micro_batches)
    return outputs, labels, inputs


def _send(holdings: EngineHoldings, detached: torch.Tensor, window: int) -> None:
    """BLLPipelineEngine's send window at its worst case (a receiver that completes no isend
    early): each output is kept until the window (2M) is full. With a prompt receiver the engine
    drops completed sends at the next send; the planner, like this, counts the worst case."""
    while len(holdings.send_window) >= window:
        holdings.send_window.popleft()
    holdings.send_window.append(detached)


def format_result(result: RehearsalResult) -> str:
    lines = [f"{result.model}: stage {result.stage} of {result.stages} ({result.decoder_layers} decoder layers, "
             f"{result.params / 1e6:.1f}M trainable parameters), {result.dtype}, b={result.micro_batch_size}, "
             f"T={result.seq_len}, M={result.micro_batches}, readout in {result.readout_slices} slice(s) "
             f"(max {result.readout_max_logits_mb:g} MiB of logits), {result.threads} thread(s)",
             f"median step {result.median_step_s:.3f} s (steps: {result.step_s}); losses {result.losses}",
             f"{'':32s}{'measured':>12s}{'planner':>12s}{'error':>8s}"]
    for name, measured, predicted in result.comparison_rows():
        error = (predicted - measured) / measured if measured else float("nan")
        lines.append(f"{name:32s}{measured:12.1f}{predicted:12.1f}{error:8.1%}")
    lines.append(f"(RSS before building the stage: {result.baseline_rss_mb:.1f} MB; the planner adds its peak, "
                 f"{result.plan['peak_bytes'] / memory.MIB:.1f} MB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/rehearse_stage.py", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="models/llama-1b.json", help="model spec (HF config JSON) the stage is cut from")
    p.add_argument("--stages", type=int, default=8, help="pipeline stages S the model is cut into")
    p.add_argument("--stage", type=int, default=None,
                   help="which stage to rehearse, 0 to S - 1 (default: the middle one, (stages - 1) // 2)")
    p.add_argument("--micro_batch_size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--micro_batches", type=int, default=2, help="micro-batches M per optimizer step")
    p.add_argument("--steps", type=int, default=3,
                   help="optimizer steps to train (the first is metered whole, the second per micro-batch)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="training precision: fp32 (torch AdamW) or bf16 (fp32 master weights, as DeepSpeed's "
                        "BF16_Optimizer)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads torch computes with (torch.set_num_threads)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stage's weights and its random inputs")
    p.add_argument("--variant", type=memory.modelled_spec, default=DEFAULT_VARIANT,
                   help="BLL variant with its options (e.g. dgl-context:dim=64:neg=2048; default: the project's "
                        "default variant)")
    p.add_argument("--readout_max_logits_mb", type=float, default=memory.READOUT_MAX_LOGITS_MB,
                   help="as --bll_readout_max_logits_mb: the local readout in sequence slices of at most this many "
                        "MiB of fp32 logits (0 = one slice)")
    p.add_argument("--malloc_mmap_threshold", type=int, default=65536,
                   help="glibc M_MMAP_THRESHOLD in bytes so that RSS tracks live bytes; 0 keeps glibc's default")
    p.add_argument("--json", type=Path, default=None, help="also write the measurements and predictions here")
    args = p.parse_args(argv)
    result = rehearse(args.model, args.stages, args.stage, args.micro_batch_size, args.seq_len, args.micro_batches,
                      args.steps, args.dtype, args.threads, args.seed, args.variant, args.malloc_mmap_threshold,
                      args.readout_max_logits_mb)
    print(format_result(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
