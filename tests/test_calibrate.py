"""The simulator checked against runs (bll_bench/calibrate.py): a slow-link run is predicted
from the stage costs its zero-delay sibling traced, and an arm without traces borrows those of
one that does the same work."""

from __future__ import annotations

import json

import pytest

from bll_bench import calibrate


def _timeline(stage: int, fwd: float, bwd: float, micro_batches: int = 2) -> dict:
    """One traced 1F1B-like step: M forwards then M backwards, back to back."""
    events, t = [], 0.0
    for op, cost in [("ForwardPass", fwd)] * micro_batches + [("BackwardPass", bwd)] * micro_batches:
        events.append({"op": op, "step": 1, "start": t, "end": t + cost})
        t += cost
    events.append({"op": "RecvActivation" if stage else "SendActivation", "step": 1, "start": t, "end": t + 1e-4})
    return {"stage": stage, "events": events}


@pytest.fixture()
def bench(tmp_path):
    runs = [{"arm": "bp", "M": 2, "repeat": 0, "link_delay_ms": 0.0, "step_s_median": 0.09,
             "run_dir": "x/M2-bp-r0"},
            {"arm": "bp", "M": 2, "repeat": 0, "link_delay_ms": 20.0, "step_s_median": 0.2,
             "run_dir": "x/M2-L20ms-bp-r0"},
            {"arm": "peer:1f1b", "M": 2, "repeat": 0, "link_delay_ms": 0.0, "step_s_median": 0.08,
             "run_dir": "x/M2-peer-1f1b-r0"}]
    for run in runs:
        (tmp_path / "runs" / run["run_dir"].split("/")[1]).mkdir(parents=True)
    traced = tmp_path / "runs" / "M2-bp-r0"
    for stage in range(2):
        (traced / f"timeline_stage{stage}.json").write_text(json.dumps(_timeline(stage, 0.01, 0.02)))
    return {"runs": runs}, tmp_path


def test_slow_link_and_peer_runs_take_their_costs_from_the_traced_zero_delay_run(bench):
    data, bench_dir = bench
    slow, peer = data["runs"][1], data["runs"][2]
    assert calibrate.cost_source(data, slow) is data["runs"][0]
    assert calibrate.cost_source(data, peer) is data["runs"][0]
    fast = calibrate.predict(data["runs"][0], bench_dir / "runs" / "M2-bp-r0")
    delayed = calibrate.predict(slow, bench_dir / "runs" / "M2-bp-r0", delay_s=0.02)
    assert delayed["link_delay_ms"] == 20.0 and delayed["costs_from"] == "M2-bp-r0"
    # 1F1B at S = 2 crosses the link on its critical path: forward there, gradient back, at least.
    assert delayed["predicted_step_s"] >= fast["predicted_step_s"] + 2 * 0.02


def test_a_slow_link_run_without_its_zero_delay_sibling_is_a_clear_error(bench):
    data, _ = bench
    lonely = {**data["runs"][1], "repeat": 1}
    with pytest.raises(SystemExit, match="needs the zero-delay bp run"):
        calibrate.cost_source(data, lonely)
