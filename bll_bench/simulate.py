"""Discrete-event simulator of pipeline schedules: backprop (GPipe, 1F1B, interleaved 1F1B, ZB-H1)
against block-local learning (with and without a flush at every step).

Model. Every stage (one device) executes its own ordered list of operations. An operation starts
when (a) its stage has finished the operation before it in that list and (b) every operation it
depends on has finished, plus the link delay when the producer is on another device:

    start(op) = max(end(previous op on the stage), max over deps d of end(d) + delay(d))

The schedules differ only in the per-stage orders and the dependencies (`_bp_schedule`,
`_bll_schedule`). Links carry each message independently (latency + bytes / bandwidth, no
contention between messages); compute and communication overlap.

Costs are seconds per MICRO-BATCH (`StageCosts`), except the optimizer, once per STEP. Every
flushed schedule puts a barrier between steps: step t+1 starts on a stage only after every
stage's optimizer step t (DeepSpeed's optimizer step reduces the gradient norm over all stages,
and a step's micro-batches must all be done before it). `bll-noflush` has no barrier: each stage
starts its next step as soon as its own step is done.

CLI: `python -m bll_bench.simulate project --model models/llama-1b.json ...` (see `main`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bll_bench.plotting import pyplot
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.infra.errors import UserError
from bll_ds.measure.flops import NotModelled
from bll_ds.method import variants

OP_KINDS = ("forward", "backward", "backward_input", "backward_weight", "local", "optimizer")
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "bll", "bll-noflush")
SCHEDULE_METHOD = {"gpipe": "bp", "1f1b": "bp", "interleaved": "bp", "zb-h1": "bp",
                   "bll": "bll", "bll-noflush": "bll"}


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class StageCosts:
    """Seconds per micro-batch for each stage k (lists of length S), optimizer per step.

    fwd[k]         forward of stage k's layers
    bwd[k]         BP backward of the whole stage (input gradient + weight gradient)
    bwd_input[k]   ZB-H1's B pass (input gradient); default bwd[k] / 2
    bwd_weight[k]  ZB-H1's W pass (weight gradient); default bwd[k] - bwd_input[k]
    local[k]       BLL: everything after the forward for one micro-batch -- the local loss forward
                   and backward plus the backward through the stage's own layers
    opt[k]         per step: optimizer step (BLL: plus the feedback-network update and publish)
    """

    fwd: list[float]
    bwd: list[float] | None = None
    local: list[float] | None = None
    opt: list[float] | None = None
    bwd_input: list[float] | None = None
    bwd_weight: list[float] | None = None

    @property
    def stages(self) -> int:
        return len(self.fwd)

    @classmethod
    def uniform(cls, stages: int, fwd: float, bwd: float = 0.0, local: float = 0.0, opt: float = 0.0,
                bwd_input: float | None = None, bwd_weight: float | None = None) -> "StageCosts":
        def each(value):
            return None if value is None else [value] * stages
        return cls(fwd=each(fwd), bwd=each(bwd), local=each(local), opt=each(opt),
                   bwd_input=each(bwd_input), bwd_weight=each(bwd_weight))

    def backward(self, k: int) -> float:
        return (self.bwd or [0.0] * self.stages)[k]

    def backward_input(self, k: int) -> float:
        return self.bwd_input[k] if self.bwd_input is not None else self.backward(k) / 2

    def backward_weight(self, k: int) -> float:
        return self.bwd_weight[k] if self.bwd_weight is not None else self.backward(k) - self.backward_input(k)

    def local_cost(self, k: int) -> float:
        return (self.local or [0.0] * self.stages)[k]

    def optimizer(self, k: int) -> float:
        return (self.opt or [0.0] * self.stages)[k]


@dataclass
class Link:
    """Point-to-point link between neighbouring stages (the same for every pair).

    activation_bytes   one micro-batch's activation (down) or activation gradient (up)
    table_bytes        BLL target table sent upstream once per step (0: no tables, e.g. dgl, drtp)
    table_lag          stage k uses during step t the table stage k+1 published after its step
                       t - table_lag (bll_ds/pipeline/feedback_channel.py: LAG = 2)
    tables_from_last   direct feedback (bll_ds/method/direct.py): stage k's table comes from the
                       last stage instead, over a link like the others, one message per stage
    """

    latency_s: float = 0.0
    bandwidth_bytes_per_s: float = math.inf
    activation_bytes: float = 0.0
    table_bytes: float = 0.0
    table_lag: int = 2
    tables_from_last: bool = False

    def delay(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s

    @property
    def activation_delay(self) -> float:
        return self.delay(self.activation_bytes)

    @property
    def table_delay(self) -> float:
        return self.delay(self.table_bytes)


@dataclass
class Event:
    """One executed operation; `micro_batch` is None for the optimizer, `chunk` is the model
    chunk (virtual stage) for the interleaved schedule, else 0."""

    stage: int
    kind: str
    micro_batch: int | None
    step: int
    start: float
    end: float
    chunk: int = 0


@dataclass
class SimResult:
    """step_time_s      steady-state time per optimizer step: the mean of `step_times_s` over
                        the second half of the steps (flushed schedules: every step is the same)
    step_times_s        per step: time between the ends of consecutive steps, a step ending when
                        its last stage's optimizer step ends (the first from time 0)
    run_time_s          end of the last event
    busy_s, idle_s      per stage over the whole run (idle = run_time - busy)
    bubble_fraction     steady-state idle share of a step, averaged over stages:
                        1 - mean_k(busy_k / steps) / step_time. It counts every idle
                        second: the schedule's fill and drain, and also stages waiting on a
                        slower one (an LM head on the last stage makes that stage the slowest)
    """

    schedule: str
    stages: int
    micro_batches: int
    steps: int
    step_time_s: float
    step_times_s: list[float]
    run_time_s: float
    busy_s: list[float]
    idle_s: list[float]
    bubble_fraction: float
    events: list[Event] = field(repr=False)


# ---------------------------------------------------------------------------------------------
# The event engine, shared by every schedule
# ---------------------------------------------------------------------------------------------

@dataclass
class _Op:
    key: tuple  # (stage, kind, chunk, micro_batch, step): unique per operation
    duration: float
    deps: list[tuple[tuple, float]]  # (key of a producer, delay after its end)


def _execute(stage_ops: list[list[_Op]]) -> list[Event]:
    """Start times of every op in dependency order (Kahn's algorithm over the DAG formed by the
    explicit dependencies plus 'the previous op on the same stage'). A cycle means the schedule
    deadlocks, which is a bug in a schedule, so it raises."""
    by_key = {op.key: op for ops in stage_ops for op in ops}
    waiting = {}      # key -> number of unfinished predecessors
    consumers = {}    # key -> keys that depend on it
    for ops in stage_ops:
        for i, op in enumerate(ops):
            preds = [dep for dep, _ in op.deps] + ([ops[i - 1].key] if i else [])
            for pred in preds:
                if pred not in by_key:
                    raise KeyError(f"{op.key} depends on {pred}, which no stage executes")
                consumers.setdefault(pred, []).append(op.key)
            waiting[op.key] = len(preds)
    previous_on_stage = {ops[i].key: ops[i - 1].key for ops in stage_ops for i in range(1, len(ops))}
    end: dict[tuple, float] = {}
    events = []
    ready = deque(key for key, count in waiting.items() if count == 0)
    while ready:
        key = ready.popleft()
        op = by_key[key]
        start = end[previous_on_stage[key]] if key in previous_on_stage else 0.0
        for dep, delay in op.deps:
            start = max(start, end[dep] + delay)
        end[key] = start + op.duration
        stage, kind, chunk, micro_batch, step = key
        events.append(Event(stage, kind, micro_batch, step, start, end[key], chunk))
        for consumer in consumers.get(key, ()):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    if len(events) != len(by_key):
        raise RuntimeError("schedule deadlocks: some operations wait on each other in a cycle")
    events.sort(key=lambda e: (e.stage, e.start, e.end))
    return events


def _summarise(schedule: str, stages: int, micro_batches: int, steps: int, events: list[Event]) -> SimResult:
    step_end = [0.0] * steps
    busy = [0.0] * stages
    for e in events:
        busy[e.stage] += e.end - e.start
        if e.kind == "optimizer":
            step_end[e.step] = max(step_end[e.step], e.end)
    step_times = [step_end[t] - (step_end[t - 1] if t else 0.0) for t in range(steps)]
    # Steady state: the mean over the second half of the steps. (A mean, not a median: with a
    # slow table link the no-flush step times alternate, and the mean is their true rate.)
    half = steps // 2
    step_time = (step_end[-1] - (step_end[half - 1] if half else 0.0)) / (steps - half)
    run_time = max(e.end for e in events)
    busy_per_step = sum(busy) / stages / steps
    return SimResult(schedule=schedule, stages=stages, micro_batches=micro_batches, steps=steps,
                     step_time_s=step_time, step_times_s=step_times, run_time_s=run_time,
                     busy_s=busy, idle_s=[run_time - b for b in busy],
                     bubble_fraction=1.0 - busy_per_step / step_time, events=events)


def _optimizer_key(stage: int, step: int) -> tuple:
    return (stage, "optimizer", 0, None, step)


def _barrier(stages: int, step: int) -> list[tuple[tuple, float]]:
    """Dependencies of a flushed step's first op: every stage's previous optimizer step."""
    return [(_optimizer_key(k, step - 1), 0.0) for k in range(stages)] if step else []


# ---------------------------------------------------------------------------------------------
# Backprop schedules: per-stage orders of (kind, chunk, micro_batch), generic dependencies
# ---------------------------------------------------------------------------------------------

def order_gpipe(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """All forwards, then all backwards (in micro-batch order)."""
    return ([("forward", 0, m) for m in range(micro_batches)]
            + [("backward", 0, m) for m in range(micro_batches)])


def order_1f1b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """DeepSpeed's TrainSchedule / PipeDream-flush: S-k-1 warm-up forwards at stage k, then one
    forward and one backward alternately, then the remaining backwards (cool-down)."""
    warmup = min(stages - stage - 1, micro_batches)
    order = [("forward", 0, m) for m in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [("forward", 0, warmup + i), ("backward", 0, i)]
    order += [("backward", 0, m) for m in range(micro_batches - warmup, micro_batches)]
    return order


def order_interleaved(stage: int, stages: int, micro_batches: int, chunks: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B (Narayanan et al. 2021). Device k holds chunks c = 0..v-1,
    i.e. virtual stages c*S + k. Its v*M forward passes run in groups of S micro-batches per
    chunk (chunk 0 for micro-batches 0..S-1, chunk 1 for the same ones, ..., then the next S);
    backwards walk the chunks in reverse. Warm-up: 2(S-k-1) + (v-1)S forwards, then 1F1B, then
    cool-down. Needs M to be a multiple of S."""
    if micro_batches % stages:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({micro_batches}) to be a multiple "
                         f"of stages ({stages})")
    total = chunks * micro_batches

    def pass_of(i: int, kind: str) -> tuple[str, int, int]:
        group, within = divmod(i, stages * chunks)
        chunk = within // stages
        if kind != "forward":
            chunk = chunks - 1 - chunk
        return kind, chunk, group * stages + within % stages

    warmup = min(2 * (stages - stage - 1) + (chunks - 1) * stages, total)
    order = [pass_of(i, "forward") for i in range(warmup)]
    for i in range(total - warmup):
        order += [pass_of(warmup + i, "forward"), pass_of(i, "backward")]
    order += [pass_of(i, "backward") for i in range(total - warmup, total)]
    return order


def order_zb_h1(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", section 2.1). The backward is
    split into B (input gradient: the next stage up waits for it) and W (weight gradient: no one
    waits for it). Same warm-up as 1F1B (S-k-1 forwards); in the steady phase stage k runs
    F, B, W triples, but its W passes lag its B passes by k micro-batches, so that every stage
    holds at most S micro-batches in flight (forward done, W not yet) -- stage 0's 1F1B peak,
    hence the same activation memory as 1F1B. The k deferred W's fill the cool-down bubbles.
    With F = B = W the bubble is (S-1)(F + B - W) = (S-1)F, a third of 1F1B's (S-1)(F + B + W)."""
    warmup = min(stages - stage - 1, micro_batches)
    deferred = stage
    order = [("forward", 0, m) for m in range(warmup)]

    def backward_pair(i: int) -> list[tuple[str, int, int]]:
        pair = [("backward_input", 0, i)]
        if i - deferred >= 0:
            pair.append(("backward_weight", 0, i - deferred))
        return pair

    for i in range(micro_batches - warmup):
        order += [("forward", 0, warmup + i)] + backward_pair(i)
    for i in range(micro_batches - warmup, micro_batches):
        order += backward_pair(i)
    first_left = max(micro_batches - deferred, 0)
    order += [("backward_weight", 0, m) for m in range(first_left, micro_batches)]
    return order


def _bp_schedule(name: str, order: Callable[[int], list[tuple[str, int, int]]], costs: StageCosts,
                 link: Link, micro_batches: int, steps: int, chunks: int = 1) -> SimResult:
    """Backprop dependencies over virtual stages j = chunk * S + k (chunks = 1: j = k):
    forward(j, m) needs forward(j-1, m); backward or backward_input(j, m) needs its own forward
    and backward(_input)(j+1, m); backward_weight(j, m) needs backward_input(j, m). Messages
    between devices pay the link's activation delay (activations down, gradients up)."""
    stages = costs.stages
    last_virtual = chunks * stages - 1
    duration = {"forward": lambda k: costs.fwd[k] / chunks,
                "backward": lambda k: costs.backward(k) / chunks,
                "backward_input": lambda k: costs.backward_input(k) / chunks,
                "backward_weight": lambda k: costs.backward_weight(k) / chunks}

    def device_and_chunk(virtual: int) -> tuple[int, int]:
        return virtual % stages, virtual // stages

    def delay(stage_a: int, stage_b: int) -> float:
        return 0.0 if stage_a == stage_b else link.activation_delay

    stage_ops = [[] for _ in range(stages)]
    for step in range(steps):
        for k in range(stages):
            passes = order(k)
            split = any(kind == "backward_input" for kind, _, _ in passes)
            backward_kind = "backward_input" if split else "backward"
            for index, (kind, chunk, m) in enumerate(passes):
                virtual = chunk * stages + k
                deps = []
                if kind == "forward" and virtual > 0:
                    up, up_chunk = device_and_chunk(virtual - 1)
                    deps.append(((up, "forward", up_chunk, m, step), delay(up, k)))
                if kind in ("backward", "backward_input"):
                    deps.append(((k, "forward", chunk, m, step), 0.0))
                    if virtual < last_virtual:
                        down, down_chunk = device_and_chunk(virtual + 1)
                        deps.append(((down, backward_kind, down_chunk, m, step), delay(down, k)))
                if kind == "backward_weight":
                    deps.append(((k, "backward_input", chunk, m, step), 0.0))
                if index == 0:
                    deps += _barrier(stages, step)
                stage_ops[k].append(_Op((k, kind, chunk, m, step), duration[kind](k), deps))
            stage_ops[k].append(_Op(_optimizer_key(k, step), costs.optimizer(k), []))
    return _summarise(name, stages, micro_batches, steps, _execute(stage_ops))


# ---------------------------------------------------------------------------------------------
# Block-local learning
# ---------------------------------------------------------------------------------------------

def _bll_schedule(name: str, costs: StageCosts, link: Link, micro_batches: int, steps: int,
                  flush: bool) -> SimResult:
    """Per micro-batch, stage k runs forward (needs stage k-1's output of the same micro-batch,
    plus the link delay) and then `local` (its local loss and its own backward); no gradient
    crosses a stage. Per step: the optimizer. Target tables (when `link.table_bytes` > 0) go
    upstream after each optimizer step; stage k's step t begins by taking the table stage k+1 (the
    last stage, for direct feedback) published after step t - lag (bll_ds/pipeline/launched/bll_schedule.py:
    BeginStep), so it waits if that table
    has not arrived. flush: a barrier between steps; no flush: none."""
    stages = costs.stages
    stage_ops = [[] for _ in range(stages)]
    for step in range(steps):
        for k in range(stages):
            for m in range(micro_batches):
                deps = []
                if k > 0:
                    deps.append(((k - 1, "forward", 0, m, step), link.activation_delay))
                if m == 0:
                    if flush:
                        deps += _barrier(stages, step)
                    table_step = step - link.table_lag
                    if link.table_bytes > 0 and k < stages - 1 and table_step >= 0:
                        source = stages - 1 if link.tables_from_last else k + 1
                        deps.append((_optimizer_key(source, table_step), link.table_delay))
                stage_ops[k].append(_Op((k, "forward", 0, m, step), costs.fwd[k], deps))
                stage_ops[k].append(_Op((k, "local", 0, m, step), costs.local_cost(k), []))
            stage_ops[k].append(_Op(_optimizer_key(k, step), costs.optimizer(k), []))
    return _summarise(name, stages, micro_batches, steps, _execute(stage_ops))


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def gpipe(costs: StageCosts, link: Link, micro_batches: int, steps: int = 1) -> SimResult:
    order = lambda k: order_gpipe(k, costs.stages, micro_batches)  # noqa: E731
    return _bp_schedule("gpipe", order, costs, link, micro_batches, steps)


def one_f_one_b(costs: StageCosts, link: Link, micro_batches: int, steps: int = 1) -> SimResult:
    order = lambda k: order_1f1b(k, costs.stages, micro_batches)  # noqa: E731
    return _bp_schedule("1f1b", order, costs, link, micro_batches, steps)


def interleaved(costs: StageCosts, link: Link, micro_batches: int, steps: int = 1, chunks: int = 2) -> SimResult:
    """`costs` are per device; each of its `chunks` model chunks costs 1/chunks of them."""
    order = lambda k: order_interleaved(k, costs.stages, micro_batches, chunks)  # noqa: E731
    return _bp_schedule("interleaved", order, costs, link, micro_batches, steps, chunks)


def zb_h1(costs: StageCosts, link: Link, micro_batches: int, steps: int = 1) -> SimResult:
    order = lambda k: order_zb_h1(k, costs.stages, micro_batches)  # noqa: E731
    return _bp_schedule("zb-h1", order, costs, link, micro_batches, steps)


def bll(costs: StageCosts, link: Link, micro_batches: int, steps: int = 1) -> SimResult:
    return _bll_schedule("bll", costs, link, micro_batches, steps, flush=True)


def bll_noflush(costs: StageCosts, link: Link, micro_batches: int, steps: int = 6) -> SimResult:
    return _bll_schedule("bll-noflush", costs, link, micro_batches, steps, flush=False)


def simulate(schedule: str, costs: StageCosts, link: Link | None = None, micro_batches: int = 1,
             steps: int = 1, chunks: int = 2) -> SimResult:
    """Run one schedule by name (one of SCHEDULES). `chunks` is used by "interleaved" only."""
    link = link or Link()
    if schedule == "interleaved":
        return interleaved(costs, link, micro_batches, steps, chunks)
    runners = {"gpipe": gpipe, "1f1b": one_f_one_b, "zb-h1": zb_h1, "bll": bll, "bll-noflush": bll_noflush}
    if schedule not in runners:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    return runners[schedule](costs, link, micro_batches, steps)


# ---------------------------------------------------------------------------------------------
# Costs of a model cut into S stages
# ---------------------------------------------------------------------------------------------

@dataclass
class LayerCosts:
    """Seconds per micro-batch of the model's pieces (optimizer and feedback: per step), measured
    on a machine or derived from FLOPs (`layer_costs_from_flops`). `stage_costs` sums them into
    per-stage costs for any number of stages.

    layer_*          one decoder layer; backward_input is ZB-H1's B share (default: half)
    embedding_*      the token embedding (stage 0); its backward is the embedding gradient
    head_*           final norm + LM head + loss (last stage)
    readout_s        BLL, each non-last stage: local loss forward + backward (its readout)
    feedback_step_s  BLL, each non-last stage, per step: feedback block update + table publish
    critic_s         BLL critic variants, each stage but the first (the last included): the critic
                     of the stage's input, forward + weight gradient (bll_ds/method/critic.py)
    *_optimizer_s    optimizer step for that piece's parameters
    """

    layer_forward_s: float
    layer_backward_s: float
    layer_backward_input_s: float | None = None
    embedding_forward_s: float = 0.0
    embedding_backward_s: float = 0.0
    head_forward_s: float = 0.0
    head_backward_s: float = 0.0
    head_backward_input_s: float | None = None
    readout_s: float = 0.0
    layer_optimizer_s: float = 0.0
    embedding_optimizer_s: float = 0.0
    head_optimizer_s: float = 0.0
    readout_optimizer_s: float = 0.0
    feedback_step_s: float = 0.0
    critic_s: float = 0.0
    critic_optimizer_s: float = 0.0


def layers_per_stage(num_layers: int, stages: int) -> list[float]:
    """DeepSpeed's partition (uniform, remainder to the first stages) when S <= L; past that, an
    idealised even split into fractions of a layer (as if layers could be cut further), so that
    projections can go to S > L."""
    if stages <= num_layers:
        base, extra = divmod(num_layers, stages)
        return [float(base + (1 if k < extra else 0)) for k in range(stages)]
    return [num_layers / stages] * stages


def balanced_layers_per_stage(layer: LayerCosts, num_layers: int, stages: int, method: str) -> list[float]:
    """The partition that gives every stage the same forward + backward time, as Megatron users
    balance a pipeline for its LM head (--decoder-last-pipeline-num-layers): the last stage takes
    fewer layers by the head's cost in layers, and under BLL every other stage carries its
    readout. Idealised: fractions of a layer are allowed (an integer split lands near it); a
    stage whose extras alone exceed the others' share gets no layers (water-filling)."""
    unit = layer.layer_forward_s + layer.layer_backward_s
    extras = [0.0] * stages
    extras[0] += (layer.embedding_forward_s + layer.embedding_backward_s) / unit
    extras[-1] += (layer.head_forward_s + layer.head_backward_s) / unit
    if method == "bll":
        for k in range(stages - 1):
            extras[k] += layer.readout_s / unit
        for k in range(1, stages):
            extras[k] += layer.critic_s / unit
    active = set(range(stages))
    while True:
        share = (num_layers + sum(extras[k] for k in active)) / len(active)
        starved = {k for k in active if share < extras[k]}
        if not starved:
            break
        active -= starved
    return [share - extras[k] if k in active else 0.0 for k in range(stages)]


def stage_costs(layer: LayerCosts, num_layers: int, stages: int, method: str, balanced: bool = False) -> StageCosts:
    """Per-stage costs of a model of `num_layers` decoder layers cut into `stages` stages, by
    DeepSpeed's uniform partition or (`balanced`) by `balanced_layers_per_stage`.
    method "bp": fwd/bwd/bwd_input/bwd_weight/opt; "bll": fwd/local/opt (local = the stage's own
    backward plus its local readout; the last stage's 'readout' is the real head and loss)."""
    if method not in ("bp", "bll"):
        raise ValueError(f"unknown method {method!r}; choose 'bp' or 'bll'")
    layer_input = layer.layer_backward_input_s
    layer_input = layer.layer_backward_s / 2 if layer_input is None else layer_input
    head_input = layer.head_backward_input_s
    head_input = layer.head_backward_s / 2 if head_input is None else head_input
    fwd, bwd, bwd_input, local, opt = [], [], [], [], []
    counts = (balanced_layers_per_stage(layer, num_layers, stages, method) if balanced
              else layers_per_stage(num_layers, stages))
    for k, layers in enumerate(counts):
        first, last = k == 0, k == stages - 1
        fwd.append(layers * layer.layer_forward_s + first * layer.embedding_forward_s
                   + last * layer.head_forward_s)
        backward = (layers * layer.layer_backward_s + first * layer.embedding_backward_s
                    + last * layer.head_backward_s)
        bwd.append(backward)
        # The embedding gradient is a weight gradient (W); the head's input share is in B.
        bwd_input.append(layers * layer_input + last * head_input)
        optimizer = (layers * layer.layer_optimizer_s + first * layer.embedding_optimizer_s
                     + last * layer.head_optimizer_s)
        if method == "bll" and not last:
            backward += layer.readout_s
            optimizer += layer.readout_optimizer_s + layer.feedback_step_s
        if method == "bll" and not first:
            backward += layer.critic_s
            optimizer += layer.critic_optimizer_s
        local.append(backward)
        opt.append(optimizer)
    if method == "bll":
        return StageCosts(fwd=fwd, local=local, opt=opt)
    return StageCosts(fwd=fwd, bwd=bwd, opt=opt, bwd_input=bwd_input,
                      bwd_weight=[b - i for b, i in zip(bwd, bwd_input)])


def layer_costs_from_flops(config, seq_len: int, micro_batch_size: int, achieved_flops: float,
                           variant: str = "prototype", memory_bytes_per_s: float = 2.0e12,
                           optimizer_bytes_per_param: float = 30.0) -> LayerCosts:
    """Costs from model FLOPs (bll_ds/measure/flops.py) at an assumed achieved FLOP/s. The
    optimizer step is memory-bound: `optimizer_bytes_per_param` bytes moved per parameter
    (bf16 training, AdamW on fp32 master weights: read master, grad, m, v and write master, m, v
    in fp32 plus the bf16 copy, about 30) at `memory_bytes_per_s`."""
    from bll_ds.measure import flops
    from bll_ds.method.variants import get as get_variant

    spec = get_variant(variant)
    tokens = seq_len * micro_batch_size
    to_s = tokens / achieved_flops
    projection = flops.layer_projection_flops(config)
    attention = flops.layer_attention_flops(config, seq_len)
    head = flops.head_forward_flops(config)
    layer_params = projection / 2  # 2 FLOPs per weight per token
    opt_s = optimizer_bytes_per_param / memory_bytes_per_s
    readout = flops.readout_flops_per_micro_batch_token(config, variant, tokens)
    return LayerCosts(
        layer_forward_s=(projection + attention) * to_s,
        layer_backward_s=2 * (projection + attention) * to_s,
        layer_backward_input_s=(projection + 2 * attention) * to_s,
        head_forward_s=head * to_s, head_backward_s=2 * head * to_s, head_backward_input_s=head * to_s,
        readout_s=readout * to_s,
        layer_optimizer_s=layer_params * opt_s,
        head_optimizer_s=config.hidden_size * config.vocab_size * opt_s,
        embedding_optimizer_s=flops.embedding_parameters(config) * opt_s,
        readout_optimizer_s=flops.feedback_parameters(config, variant) * opt_s,
        feedback_step_s=flops.feedback_step_flops(config, variant) / achieved_flops,
        critic_s=spec.input_critic_flops_per_token(config) * to_s,
        critic_optimizer_s=spec.input_critic_parameters(config) * opt_s)


# ---------------------------------------------------------------------------------------------
# Projection over S and M
# ---------------------------------------------------------------------------------------------

BALANCED = "-balanced"
# The projection's arms: every schedule on DeepSpeed's uniform partition, and the backprop
# schedules users balance for the LM head (and BLL's no-flush schedule) on the balanced one.
PROJECTION_ARMS = ("gpipe", "1f1b", "1f1b" + BALANCED, "interleaved", "zb-h1", "zb-h1" + BALANCED,
                   "bll", "bll-noflush", "bll-noflush" + BALANCED)
REFERENCE_ARM = "zb-h1" + BALANCED  # the strongest backprop arm here: every projection row compares with it


def project(costs_for: Callable[[int, str, bool], StageCosts], link: Link, tokens_per_micro_batch: int,
            stage_counts=(4, 8, 16, 32, 64), micro_batch_factors=(1, 2, 4, 8), arms=PROJECTION_ARMS,
            chunks: int = 2, noflush_steps: int = 6) -> list[dict]:
    """One row per (arm, S, M) with M = factor * S: step_s (steady state), bubble, tokens_per_s,
    speedup_vs_1f1b (over 1F1B on DeepSpeed's partition at the same S, M) and
    speedup_vs_zb_h1_balanced (over ZB-H1 on the balanced partition); None where that arm is not
    simulated. An arm is a schedule, with "-balanced" on `balanced_layers_per_stage`'s partition.
    `costs_for(S, method, balanced)` gives the stage costs, method "bp" or "bll" (`stage_costs`).

    Steps simulated: the barrier makes every flushed BP step identical, so 1 suffices; flushed
    BLL runs table_lag + 1 so that a table arriving late would show; the no-flush schedule runs
    `noflush_steps` so that its pipe fill washes out of the steady-state mean."""
    rows = []
    for stages in stage_counts:
        costs = {}
        for factor in micro_batch_factors:
            micro_batches = factor * stages
            found = {}
            for arm in arms:
                name, balanced = arm.removesuffix(BALANCED), arm.endswith(BALANCED)
                method = SCHEDULE_METHOD[name]
                if (method, balanced) not in costs:
                    costs[method, balanced] = costs_for(stages, method, balanced)
                steps = {"bll": link.table_lag + 1, "bll-noflush": noflush_steps}.get(name, 1)
                found[arm] = simulate(name, costs[method, balanced], link, micro_batches, steps, chunks)
                rows.append(dict(schedule=arm, S=stages, M=micro_batches, step_s=found[arm].step_time_s,
                                 bubble=found[arm].bubble_fraction,
                                 tokens_per_s=micro_batches * tokens_per_micro_batch / found[arm].step_time_s))
            for row in rows[-len(arms):]:
                for key, reference in (("speedup_vs_1f1b", "1f1b"), ("speedup_vs_zb_h1_balanced", REFERENCE_ARM)):
                    row[key] = found[reference].step_time_s / row["step_s"] if reference in found else None
    return rows


# ---------------------------------------------------------------------------------------------
# Reports: markdown table, plots
# ---------------------------------------------------------------------------------------------

def projection_markdown(rows: list[dict]) -> str:
    lines = ["| schedule | S | M | step (s) | bubble | tokens/s | vs 1F1B | vs balanced ZB-H1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def ratio(value):
        return "" if value is None else f"{value:.3f}"
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['S']} | {r['M']} | {r['step_s']:.4g} | {r['bubble']:.3f} "
                     f"| {r['tokens_per_s']:.4g} | {ratio(r['speedup_vs_1f1b'])} "
                     f"| {ratio(r.get('speedup_vs_zb_h1_balanced'))} |")
    return "\n".join(lines) + "\n"


def compact_markdown(rows: list[dict]) -> str:
    """One line per (S, M): every arm's tokens/s over balanced ZB-H1 (the strongest backprop arm
    simulated), and its bubble, so that the balanced and unbalanced baselines sit side by side."""
    arms = list(dict.fromkeys(r["schedule"] for r in rows))
    by = {(r["schedule"], r["S"], r["M"]): r for r in rows}
    lines = ["| S | M | " + " | ".join(arms) + f" | {REFERENCE_ARM} bubble |",
             "| ---: | ---: | " + " | ".join("---:" for _ in arms) + " | ---: |"]
    for stages, micro_batches in dict.fromkeys((r["S"], r["M"]) for r in rows):
        cells = []
        for arm in arms:
            speedup = by[(arm, stages, micro_batches)].get("speedup_vs_zb_h1_balanced")
            cells.append("" if speedup is None else f"{speedup:.3f}")
        reference = by.get((REFERENCE_ARM, stages, micro_batches))
        bubble = "" if reference is None else f"{reference['bubble']:.3f}"
        lines.append(f"| {stages} | {micro_batches} | " + " | ".join(cells) + f" | {bubble} |")
    return "\n".join(lines) + "\n"


OP_COLOURS = {"forward": "tab:blue", "backward": "tab:orange", "backward_input": "tab:orange",
              "backward_weight": "gold", "local": "tab:green", "optimizer": "tab:gray"}


def plot_projection(rows: list[dict], path: Path) -> None:
    """Bubble fraction (top) and speedup vs balanced ZB-H1 (bottom; vs 1F1B where that arm was
    not simulated) against S, one column per M/S."""
    plt = pyplot()

    factors = sorted({r["M"] // r["S"] for r in rows})
    key = "speedup_vs_zb_h1_balanced" if any(r.get("speedup_vs_zb_h1_balanced") for r in rows) else "speedup_vs_1f1b"
    names = list(dict.fromkeys(r["schedule"] for r in rows))
    fig, axes = plt.subplots(2, len(factors), figsize=(3.2 * len(factors), 6), squeeze=False, sharex=True)
    for col, factor in enumerate(factors):
        for name in names:
            mine = sorted((r for r in rows if r["schedule"] == name and r["M"] == factor * r["S"]),
                          key=lambda r: r["S"])
            xs = [r["S"] for r in mine]
            axes[0][col].plot(xs, [r["bubble"] for r in mine], marker="o", label=name)
            if mine and mine[0].get(key) is not None:
                axes[1][col].plot(xs, [r[key] for r in mine], marker="o", label=name)
        axes[0][col].set_title(f"M = {factor} S")
        axes[1][col].set_xlabel("stages S")
        axes[1][col].set_xscale("log", base=2)
    axes[0][0].set_ylabel("bubble fraction")
    axes[1][0].set_ylabel("tokens/s over " + ("balanced ZB-H1" if key == "speedup_vs_zb_h1_balanced" else "1F1B"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize="small")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(results: list[SimResult], path: Path) -> None:
    """One panel per schedule, one row per stage, a coloured box per operation."""
    plt = pyplot()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 1.0 + 0.35 * results[0].stages * len(results)),
                             squeeze=False, sharex=True)
    for ax, result in zip(axes[:, 0], results):
        for e in result.events:
            ax.broken_barh([(e.start, e.end - e.start)], (e.stage - 0.4, 0.8),
                           facecolors=OP_COLOURS[e.kind], edgecolor="black", linewidth=0.3)
        ax.set_ylim(result.stages - 0.5, -0.5)
        ax.set_yticks(range(result.stages))
        ax.set_ylabel("stage")
        ax.set_title(f"{result.schedule}: S={result.stages}, M={result.micro_batches}, "
                     f"{result.steps} steps, bubble {result.bubble_fraction:.2f}", fontsize="small")
    axes[-1][0].set_xlabel("time (s)")
    kinds = sorted({e.kind for r in results for e in r.events}, key=OP_KINDS.index)
    fig.legend(handles=[Patch(color=OP_COLOURS[k], label=k) for k in kinds], loc="upper right",
               fontsize="small", ncol=len(kinds))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bll_bench.simulate",
                                     description="Pipeline-schedule simulator (BP schedules vs BLL).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("project", help="step time, bubble and speedup over S and M, from model FLOPs",
                       formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="model spec (HF config JSON), e.g. models/llama-1b.json")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro_batch_size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--achieved_tflops", type=float, default=400.0, help="achieved TFLOP/s per device")
    p.add_argument("--memory_gbps", type=float, default=2000.0,
                   help="achieved memory bandwidth per device, GB/s (optimizer step cost)")
    p.add_argument("--latency_us", type=float, default=10.0, help="link latency per message, microseconds")
    p.add_argument("--bandwidth_gbps", type=float, default=25.0, help="link bandwidth, GB/s")
    p.add_argument("--dtype_bytes", type=int, default=2, help="bytes per activation / table element (bf16)")
    p.add_argument("--variant", default="prototype", type=variants.argparse_type,
                   help="BLL variant with its options, e.g. dgl-context:dim=64:neg=2048 (docs/METHOD.md)")
    p.add_argument("--stages", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="values of S")
    p.add_argument("--micro_batch_factors", type=int, nargs="+", default=[1, 2, 4, 8], help="M / S values")
    p.add_argument("--chunks", type=int, default=2, help="model chunks per device (interleaved 1F1B)")
    p.add_argument("--timeline_stages", type=int, default=4, help="S of timeline.png")
    p.add_argument("--timeline_micro_batches", type=int, default=8, help="M of timeline.png")
    p.add_argument("--out", required=True, help="output folder")
    return parser


def projection_setup(config, variant: str, args: argparse.Namespace) -> tuple[LayerCosts, Link, int]:
    """The layer costs, the link and the tokens per micro-batch a projection of `variant` at
    `config`'s shape uses, from the projection's arguments (seq_len, micro_batch_size,
    achieved_tflops, memory_gbps, latency_us, bandwidth_gbps, dtype_bytes)."""
    try:
        layer = layer_costs_from_flops(config, args.seq_len, args.micro_batch_size, args.achieved_tflops * 1e12,
                                       variant, memory_bytes_per_s=args.memory_gbps * 1e9)
    except NotModelled as err:
        raise UserError(f"block-local learning with {variant!r} is not modelled: {err}.",
                        "declare readout_flops_per_token in the variant's class, or project another --variant.") from None
    tokens = args.seq_len * args.micro_batch_size
    spec = variants.get(variant)
    link = Link(latency_s=args.latency_us * 1e-6, bandwidth_bytes_per_s=args.bandwidth_gbps * 1e9,
                activation_bytes=tokens * config.hidden_size * args.dtype_bytes,
                table_bytes=spec.table_bytes_per_step(config, args.dtype_bytes),
                tables_from_last=spec.block.tables_from_last_stage)
    return layer, link, tokens


def run_projection(args: argparse.Namespace) -> list[dict]:
    from bll_ds.modeling import load_model_spec

    config = load_model_spec(args.model)
    layer, link, tokens = projection_setup(config, args.variant, args)

    def costs_for(stages: int, method: str, balanced: bool = False) -> StageCosts:
        return stage_costs(layer, config.num_hidden_layers, stages, method, balanced)

    rows = project(costs_for, link, tokens, args.stages, args.micro_batch_factors, chunks=args.chunks)
    for row in rows:
        row["fractional_layers"] = row["S"] > config.num_hidden_layers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(args={k: v for k, v in vars(args).items() if k != "command"},
                  layer_costs=asdict(layer), link=asdict(link), num_layers=config.num_hidden_layers,
                  note="rows with fractional_layers cut the model into fractions of a layer per stage "
                       "(S > num_layers, see layers_per_stage)", rows=rows)
    (out / "projection.json").write_text(json.dumps(report, indent=2))
    (out / "projection.md").write_text(projection_markdown(rows))
    (out / "projection_vs_zb_h1_balanced.md").write_text(compact_markdown(rows))
    plot_projection(rows, out / "projection.png")

    s, m = args.timeline_stages, args.timeline_micro_batches
    timeline = [simulate(name, costs_for(s, SCHEDULE_METHOD[name]), link, m, 2, args.chunks)
                for name in SCHEDULES if name != "interleaved" or m % s == 0]
    plot_timeline(timeline, out / "timeline.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "project":
        try:
            rows = run_projection(args)
        except UserError as err:
            print(f"bll-ds simulate: error: {err}", file=sys.stderr)
            return 2
        print(projection_markdown(rows), end="")
        print(f"wrote {args.out}/projection.json, projection.md, projection_vs_zb_h1_balanced.md, "
              f"projection.png, timeline.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
