"""Check the schedule simulator against measured runs.

    python -m bll_bench.calibrate runs/bench-l25

For every run of a `compare` benchmark: per-stage costs come from the run's traced warm-up steps
(timeline_stage{k}.json: median forward, backward, local-loss instruction per micro-batch, and
the per-step rest: optimizer, gradient reduction, feedback update, the Python between
instructions); the simulator predicts the step time of the run's schedule from those costs; the
prediction is compared with the run's measured median step time over its later, untraced steps.
Writes calibration.json and calibration.md into the benchmark folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from bll_bench.plots import OP_KIND
from bll_bench.simulate import Link, StageCosts, simulate
from bll_ds.infra.atomic import atomic_write_text
from bll_ds.pipeline.trace import read_timelines
from bll_ds.run import run_dir as names

SCHEDULE_OF_ARM = {"bp": "1f1b", "bll-flush": "bll", "bll": "bll-noflush", "peer:1f1b": "1f1b"}
# An arm without timelines of its own borrows the per-stage costs of one that does the same work
# per micro-batch: torch's 1F1B runs DeepSpeed's 1F1B's forward and backward on the same stages.
COSTS_FROM = {"peer:1f1b": "bp"}
PER_MICRO_BATCH = {
    "fwd": ("ForwardPass", "ForwardBLL", "LoadMicroBatch", "LoadTargets"),
    "bwd": ("BackwardPass",),
    "local": ("LocalBackward",),
}
WAITS = ("RecvActivation", "RecvActivationBLL", "RecvGrad", "SendActivation", "SendActivationBLL", "SendGrad")


def stage_costs_from_timelines(run_dir: Path, micro_batches: int) -> tuple[StageCosts, float]:
    """Costs per stage, and the link latency: the shortest receive seen (a transfer that did not
    have to wait for its sender), which bounds what moving one activation costs."""
    costs = {"fwd": [], "bwd": [], "local": [], "opt": []}
    receives = []
    for timeline in read_timelines(run_dir):
        by_step = defaultdict(list)
        for event in timeline["events"]:
            by_step[event["step"]].append(event)
        per_mb = {key: [] for key in PER_MICRO_BATCH}
        per_step_rest = []
        for events in by_step.values():
            span = max(e["end"] for e in events) - min(e["start"] for e in events)
            mb_ops = {key: sum(e["end"] - e["start"] for e in events if e["op"] in ops)
                      for key, ops in PER_MICRO_BATCH.items()}
            for key, total in mb_ops.items():
                per_mb[key].append(total / micro_batches)
            waits = sum(e["end"] - e["start"] for e in events if e["op"] in WAITS)
            # Everything that is neither per-micro-batch compute nor waiting happens once a step.
            per_step_rest.append(span - sum(mb_ops.values()) - waits)
            receives += [e["end"] - e["start"] for e in events if e["op"].startswith("Recv")]
        for key in PER_MICRO_BATCH:
            costs[key].append(statistics.median(per_mb[key]))
        costs["opt"].append(statistics.median(per_step_rest))
    latency = min(receives) if receives else 0.0
    return StageCosts(fwd=costs["fwd"], bwd=costs["bwd"], local=costs["local"], opt=costs["opt"]), latency


def _run_dir(bench_dir: Path, run: dict) -> Path:
    """The run's folder inside this benchmark folder (which may have been moved since)."""
    run_dir = bench_dir / "runs" / Path(run["run_dir"]).name
    if not read_timelines(run_dir):
        raise SystemExit(f"bll-ds calibrate: error: {run_dir} has no timeline_stage*.json. Fix: re-run the "
                         "benchmark with tracing on (pretrain.py --trace_steps, default 3).")
    return run_dir


def arm_kind(arm: str) -> str:
    """bll:VARIANT and bll-flush:VARIANT run the schedule of their bare arm."""
    return arm if arm.startswith("peer:") else arm.partition(":")[0]


def predict(run: dict, run_dir: Path, delay_s: float = 0.0) -> dict:
    """The simulator's step time for `run`, from the stage costs traced in `run_dir` (the run
    itself, or, for a slow-link run, its zero-delay sibling), with `delay_s` added to the link."""
    costs, latency = stage_costs_from_timelines(run_dir, run["M"])
    schedule = SCHEDULE_OF_ARM[arm_kind(run["arm"])]
    # A no-flush BLL pipeline fills once, so its steady state needs many steps; with a slow link
    # 1F1B's critical path crosses the link inside each step, so it needs several too.
    steps = 12 if schedule == "bll-noflush" else 6 if delay_s else 1
    result = simulate(schedule, costs, Link(latency_s=latency + delay_s), micro_batches=run["M"], steps=steps)
    measured = run["step_s_median"]
    return {"arm": run["arm"], "M": run["M"], "repeat": run["repeat"], "schedule": schedule,
            "link_delay_ms": run.get("link_delay_ms", 0.0), "costs_from": run_dir.name,
            "predicted_step_s": result.step_time_s, "measured_step_s": measured,
            "error": result.step_time_s / measured - 1, "latency_s": latency,
            "costs": {"fwd": costs.fwd, "bwd": costs.bwd, "local": costs.local, "opt": costs.opt}}


def cost_source(bench: dict, run: dict) -> dict:
    """The run whose timelines price `run`'s stages: the zero-delay run of the same arm (or of
    COSTS_FROM's arm), M and repeat. A prediction for a slow link is made from costs measured
    without it: a forecast, not a fit."""
    arm = COSTS_FROM.get(run["arm"], run["arm"])
    if arm == run["arm"] and not run.get("link_delay_ms"):
        return run
    for other in bench["runs"]:
        if (other["arm"], other["M"], other["repeat"]) == (arm, run["M"], run["repeat"]) \
                and not other.get("link_delay_ms"):
            return other
    raise SystemExit(f"bll-ds calibrate: error: {run['arm']} at M={run['M']}, repeat {run['repeat']} needs the "
                     f"zero-delay {arm} run of the same M and repeat for its stage costs. Fix: include {arm} and "
                     "0 in the benchmark's --arms and --link_delays_ms.")


def time_breakdown(run_dir: Path) -> list[dict[str, float]]:
    """Per stage, the share of the traced steps' wall time by kind of work (plots.OP_KIND); "other"
    is the time between instructions (DeepSpeed's and our Python)."""
    shares = []
    for timeline in read_timelines(run_dir):
        events = timeline["events"]
        by_kind = defaultdict(float)
        spans = defaultdict(list)
        for e in events:
            by_kind[OP_KIND.get(e["op"], "other")] += e["end"] - e["start"]
            spans[e["step"]] += [e["start"], e["end"]]
        total = sum(max(v) - min(v) for v in spans.values())
        by_kind["other"] += total - sum(by_kind.values())
        shares.append({kind: seconds / total for kind, seconds in sorted(by_kind.items())})
    return shares


def breakdown_markdown(bench: dict, bench_dir: Path) -> str:
    kinds = ("forward", "backward", "local loss + backward", "optimizer", "wait / p2p", "other")
    lines = ["| M | link delay ms | arm | stage | " + " | ".join(kinds) + " |", "| --- " * (4 + len(kinds)) + "|"]
    for run in bench["runs"]:
        # Peer and nanoGPT arms trace nothing: they have no rows here.
        run_dir = bench_dir / "runs" / Path(run["run_dir"]).name
        if run["repeat"] != 0 or not names.timelines(run_dir):
            continue
        for stage, share in enumerate(time_breakdown(run_dir)):
            lines.append(f"| {run['M']} | {run.get('link_delay_ms', 0.0):g} | {run['arm']} | {stage} | "
                         + " | ".join(f"{share.get(k, 0.0):.0%}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "",
             "| M | link delay ms | arm | schedule | measured step s (median of repeats) | predicted step s | "
             "error (median, min-max) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    groups = defaultdict(list)
    for row in rows:
        groups[(row["M"], row.get("link_delay_ms", 0.0), row["arm"])].append(row)
    for (m, delay, arm), group in groups.items():
        errors = [r["error"] for r in group]
        lines.append(f"| {m} | {delay:g} | {arm} | {group[0]['schedule']} | "
                     f"{statistics.median(r['measured_step_s'] for r in group):.3f} | "
                     f"{statistics.median(r['predicted_step_s'] for r in group):.3f} | "
                     f"{statistics.median(errors):+.1%} ({min(errors):+.1%} to {max(errors):+.1%}) |")
    worst = max(abs(r["error"]) for r in rows)
    lines += ["", f"Largest single-run error: {worst:.1%} over {len(rows)} runs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bll_bench.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_dir", help="a folder written by `python -m bll_bench compare`")
    args = parser.parse_args(argv)
    bench_dir = Path(args.bench_dir)
    bench = json.loads((bench_dir / "bench.json").read_text())
    rows = [predict(run, _run_dir(bench_dir, cost_source(bench, run)), run.get("link_delay_ms", 0.0) / 1000)
            for run in bench["runs"] if arm_kind(run["arm"]) in SCHEDULE_OF_ARM]
    command = "python -m bll_bench.calibrate " + " ".join(argv)
    atomic_write_text(bench_dir / "calibration.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(bench_dir / "calibration.md", markdown(rows, command) + "\nWhere the traced steps' time "
                      "went (repeat 0):\n\n" + breakdown_markdown(bench, bench_dir))
    print((bench_dir / "calibration.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
