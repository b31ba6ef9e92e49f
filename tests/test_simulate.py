"""bll_bench/simulate.py: closed forms for uniform costs, link delays, dependency rules, CLI.

Costs are small integers (and link delays binary fractions), so every expected time is exact.
"""

import json

import pytest

from bll_bench.simulate import (PROJECTION_ARMS, SCHEDULES, LayerCosts, Link, StageCosts,
                                   balanced_layers_per_stage, main, simulate, stage_costs)
from helpers import REPO

F, B = 1.0, 2.0  # forward, full backward per micro-batch and stage


# --- backprop schedules ---------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro_batches", [(1, 1), (2, 1), (2, 4), (3, 7), (4, 2), (4, 4), (4, 8), (8, 16)])
def test_gpipe_and_1f1b_step_time(schedule, stages, micro_batches):
    """(M + S - 1)(f + b), bubble (S - 1) / (M + S - 1); for 1F1B also with M < S (shorter warm-up)."""
    result = simulate(schedule, StageCosts.uniform(stages, fwd=F, bwd=B), micro_batches=micro_batches, steps=2)
    assert result.step_time_s == (micro_batches + stages - 1) * (F + B)
    assert result.step_times_s == [result.step_time_s] * 2  # flushed: every step alike
    assert result.bubble_fraction == pytest.approx((stages - 1) / (micro_batches + stages - 1), abs=1e-12)


@pytest.mark.parametrize("stages,micro_batches,chunks", [(2, 2, 2), (4, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2), (4, 12, 4)])
def test_interleaved_step_time(stages, micro_batches, chunks):
    """Megatron's interleaved 1F1B: M(f+b) + (S-1)(f+b)/v, i.e. a bubble of (S-1)/(vM) of the ideal."""
    f, b = 4.0, 8.0  # divisible by every v used here
    result = simulate("interleaved", StageCosts.uniform(stages, fwd=f, bwd=b), micro_batches=micro_batches,
                      steps=2, chunks=chunks)
    ideal = micro_batches * (f + b)
    assert result.step_time_s == ideal + (stages - 1) * (f + b) / chunks
    assert (result.step_time_s - ideal) / ideal == pytest.approx((stages - 1) / (chunks * micro_batches))


def test_interleaved_needs_a_multiple_of_stages():
    with pytest.raises(ValueError, match="multiple"):
        simulate("interleaved", StageCosts.uniform(4, fwd=1, bwd=2), micro_batches=6)


@pytest.mark.parametrize("stages,micro_batches", [(2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16)])
@pytest.mark.parametrize("fbw", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (3, 2, 1)])
def test_zb_h1_bubble(stages, micro_batches, fbw):
    """Qi et al. 2023: ZB-H1's bubble is (S-1)(F + B - W) against 1F1B's (S-1)(F + B + W); with
    F = B = W a third of it. Holds here for M >= S and W <= B (the paper's regime)."""
    f, b, w = fbw
    costs = StageCosts.uniform(stages, fwd=f, bwd=b + w, bwd_input=b, bwd_weight=w)
    zb = simulate("zb-h1", costs, micro_batches=micro_batches, steps=2)
    one_f_one_b = simulate("1f1b", costs, micro_batches=micro_batches, steps=2)
    ideal = micro_batches * (f + b + w)
    assert zb.step_time_s == ideal + (stages - 1) * (f + b - w)
    assert one_f_one_b.step_time_s == ideal + (stages - 1) * (f + b + w)
    if f == b == w:
        assert zb.step_time_s - ideal == (one_f_one_b.step_time_s - ideal) / 3


def test_zb_h1_default_split_is_half_and_half():
    halves = simulate("zb-h1", StageCosts.uniform(4, fwd=2, bwd=4), micro_batches=8)
    explicit = simulate("zb-h1", StageCosts.uniform(4, fwd=2, bwd=4, bwd_input=2, bwd_weight=2), micro_batches=8)
    assert halves.step_time_s == explicit.step_time_s == 8 * 6 + 3 * 2


# --- block-local learning -------------------------------------------------------------------

@pytest.mark.parametrize("stages,micro_batches", [(1, 1), (2, 3), (4, 4), (4, 8), (8, 2)])
def test_bll_flush_and_noflush_step_time(stages, micro_batches):
    f, local, opt = 1.0, 3.0, 2.0
    costs = StageCosts.uniform(stages, fwd=f, local=local, opt=opt)
    flushed = simulate("bll", costs, micro_batches=micro_batches, steps=3)
    assert flushed.step_times_s == [(stages - 1) * f + micro_batches * (f + local) + opt] * 3
    steady = micro_batches * (f + local) + opt
    free = simulate("bll-noflush", costs, micro_batches=micro_batches, steps=6)
    assert free.step_times_s[0] == flushed.step_times_s[0]  # the first step fills the pipe
    assert free.step_times_s[1:] == [steady] * 5               # then no bubble at all
    assert free.step_time_s == steady
    assert free.bubble_fraction == 0.0
    assert free.run_time_s == (stages - 1) * f + 6 * steady


def test_bll_noflush_runs_at_the_slowest_stage():
    costs = StageCosts(fwd=[1, 1, 2, 1], local=[3, 3, 5, 3], opt=[1, 1, 1, 1])
    result = simulate("bll-noflush", costs, Link(table_bytes=1), micro_batches=4, steps=8)
    assert result.step_time_s == 4 * (2 + 5) + 1


def test_bll_waits_for_a_late_table():
    """Stage k takes at step t the table stage k+1 published after step t - 2: with a table
    link slower than a step, stage 0's step 2 starts exactly when stage 1's table of step 0 lands."""
    link = Link(table_bytes=100.0, bandwidth_bytes_per_s=1.0, table_lag=2)
    result = simulate("bll-noflush", StageCosts.uniform(2, fwd=1, local=1, opt=1), link, micro_batches=2, steps=4)
    opt_end = {(e.stage, e.step): e.end for e in result.events if e.kind == "optimizer"}
    first = {(e.stage, e.step): e.start for e in result.events if e.kind == "forward" and e.micro_batch == 0}
    assert first[(0, 2)] == opt_end[(1, 0)] + 100.0
    assert first[(0, 1)] == opt_end[(0, 0)]  # steps 0, 1 use the start-up table: no wait


# --- links ----------------------------------------------------------------------------------

def test_link_latency_and_bandwidth_two_stages():
    link = Link(latency_s=0.25, bandwidth_bytes_per_s=4.0, activation_bytes=1.0)  # delay 0.5
    d = 0.5
    M, f, b, local, opt = 3, 1.0, 2.0, 3.0, 1.0
    bp = StageCosts.uniform(2, fwd=f, bwd=b)
    # GPipe: activations down once (d), gradients up once (d) on the critical path.
    assert simulate("gpipe", bp, link, M).step_time_s == (M + 1) * (f + b) + 2 * d
    # 1F1B with one micro-batch: one round trip.
    assert simulate("1f1b", bp, link, 1).step_time_s == 2 * (f + b) + 2 * d
    # 1F1B, M = 3, worked by hand: stage 0 runs F0 F1 B0 F2 B1 B2 and waits a round trip
    # (F + B + 2d on stage 1) for every gradient.
    assert simulate("1f1b", bp, link, M).step_time_s == 14.0
    # BLL: only the downstream activation delay, once.
    blll = StageCosts.uniform(2, fwd=f, local=local, opt=opt)
    assert simulate("bll", blll, link, M).step_time_s == f + d + M * (f + local) + opt
    assert simulate("bll-noflush", blll, link, M, steps=6).step_time_s == M * (f + local) + opt


# --- dependencies ---------------------------------------------------------------------------

def check_dependencies(result, delay: float, chunks: int = 1):
    events = {(e.stage, e.kind, e.chunk, e.micro_batch, e.step): e for e in result.events}
    stages = result.stages
    # every stage runs one op at a time
    for k in range(stages):
        mine = sorted((e for e in result.events if e.stage == k), key=lambda e: e.start)
        assert all(a.end <= b.start for a, b in zip(mine, mine[1:]))
    step_end = {}
    for e in result.events:
        if e.kind == "optimizer":
            step_end[e.step] = max(step_end.get(e.step, 0.0), e.end)
    last_virtual = stages * chunks - 1
    for (k, kind, chunk, m, step), e in events.items():
        virtual = chunk * stages + k

        def producer(j, wanted):
            return events[(j % stages, wanted, j // stages, m, step)]

        if result.schedule in ("gpipe", "1f1b", "interleaved", "zb-h1", "bll") and step > 0:
            assert e.start >= step_end[step - 1]  # flush barrier
        if kind == "forward" and virtual > 0:
            up = producer(virtual - 1, "forward")
            assert e.start >= up.end + (delay if up.stage != k else 0.0)
        if kind in ("backward", "backward_input"):
            assert e.start >= events[(k, "forward", chunk, m, step)].end
            if virtual < last_virtual:
                down = producer(virtual + 1, kind)
                assert e.start >= down.end + delay
        if kind == "backward_weight":
            assert e.start >= events[(k, "backward_input", chunk, m, step)].end
        if kind == "local":
            assert e.start >= events[(k, "forward", chunk, m, step)].end
        if kind == "optimizer":
            assert all(o.end <= e.start for o in result.events if o.stage == k and o.step == step
                       and o.kind != "optimizer")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dependencies_respected(schedule):
    delay = 0.375
    link = Link(latency_s=delay)
    costs = StageCosts(fwd=[1, 2, 1, 3], bwd=[2, 3, 2, 5], local=[3, 4, 2, 6], opt=[1, 1, 2, 1],
                       bwd_input=[1, 2, 1, 2], bwd_weight=[1, 1, 1, 3])
    result = simulate(schedule, costs, link, micro_batches=8, steps=3, chunks=2)
    chunks = 2 if schedule == "interleaved" else 1
    per_micro_batch = {"gpipe": 2, "1f1b": 2, "interleaved": 4, "zb-h1": 3, "bll": 2, "bll-noflush": 2}[schedule]
    assert len(result.events) == 3 * 4 * (8 * per_micro_batch + 1)
    check_dependencies(result, delay, chunks)
    assert sum(result.busy_s) + sum(result.idle_s) == pytest.approx(4 * result.run_time_s)


# --- CLI ------------------------------------------------------------------------------------

def test_cli_project_writes_its_files(tmp_path):
    out = tmp_path / "proj"
    main(["project", "--model", str(REPO / "models/test-1m.json"), "--seq_len", "64",
          "--stages", "2", "8", "--micro_batch_factors", "1", "2", "--timeline_stages", "2",
          "--timeline_micro_batches", "4", "--out", str(out)])
    report = json.loads((out / "projection.json").read_text())
    assert len(report["rows"]) == len(PROJECTION_ARMS) * 2 * 2
    by = {(r["schedule"], r["S"], r["M"]): r for r in report["rows"]}
    assert by[("1f1b", 2, 4)]["speedup_vs_1f1b"] == 1.0
    assert by[("zb-h1-balanced", 8, 16)]["speedup_vs_zb_h1_balanced"] == 1.0
    assert all(0.0 <= r["bubble"] < 1.0 for r in report["rows"])
    assert (out / "projection.md").read_text().startswith("| schedule |")
    for png in ("projection.png", "timeline.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


# --- balanced stage boundaries -----------------------------------------------------------------

def test_balanced_partition_equalises_stage_time_around_the_head_and_readouts():
    layer = LayerCosts(layer_forward_s=1.0, layer_backward_s=2.0, head_forward_s=1.0, head_backward_s=2.0,
                       embedding_forward_s=0.0, readout_s=0.75)
    bp = balanced_layers_per_stage(layer, 8, 4, "bp")
    assert sum(bp) == pytest.approx(8) and bp == pytest.approx([2.25, 2.25, 2.25, 1.25])
    costs = stage_costs(layer, 8, 4, "bp", balanced=True)
    totals = [f + b for f, b in zip(costs.fwd, costs.bwd)]
    assert totals == pytest.approx([totals[0]] * 4)
    # BLL: the three non-last stages carry a readout of 0.25 layers each.
    bll = balanced_layers_per_stage(layer, 8, 4, "bll")
    assert sum(bll) == pytest.approx(8) and bll == pytest.approx([2.1875, 2.1875, 2.1875, 1.4375])
    bll_costs = stage_costs(layer, 8, 4, "bll", balanced=True)
    assert [f + l for f, l in zip(bll_costs.fwd, bll_costs.local)] == pytest.approx([7.3125] * 4)
    # A head heavier than a stage's share: the last stage gets no layers, the others share them.
    heavy = LayerCosts(layer_forward_s=1.0, layer_backward_s=2.0, head_forward_s=10.0, head_backward_s=20.0)
    assert balanced_layers_per_stage(heavy, 4, 3, "bp") == pytest.approx([2.0, 2.0, 0.0])
    # Balancing never slows the pipeline down: the slowest stage is no slower than the uniform split's.
    uniform = stage_costs(layer, 8, 4, "bp")
    assert max(totals) <= max(f + b for f, b in zip(uniform.fwd, uniform.bwd))
