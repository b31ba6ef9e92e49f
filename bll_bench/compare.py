"""Block-local learning against pipeline backprop, side by side, through the deepspeed launcher.

    python -m bll_bench compare --model models/llama-25m.json \
        --deepspeed_config ds_configs/llama-25m.json --tokenizer bpe:4096 \
        --data ../shared/data/tinyshakespeare.txt --stages 2 --steps 10 \
        --micro_batches 2,4,8 --arms bp,bll-flush,bll --repeats 3 --out runs/bench-l25

Every run is a real `deepspeed ... scripts/pretrain.py` launch on the same model, data, stages,
micro-batch size and seed; only the method (the arm) and the number of micro-batches M differ.
Runs are interleaved (every arm once per M, then the next repeat, in alternating order) so that
drift on a shared machine hits every arm alike. A run whose summary.json exists is not run again:
a killed benchmark continues where it stopped.

Outputs in --out: bench.json (every run and the medians/ratios), bench.md (the tables), and PNG
plots (plots.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from bll_bench import nanogpt_arm
from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.run.config_file import with_config
from bll_ds.infra.errors import UserError
from bll_ds.method.variants import get as get_variant
from bll_ds.run import run_dir as names

REPO = Path(__file__).resolve().parents[1]

# What each arm adds to the pretrain.py command line.
ARMS = {
    "bp": ["--method", "bp"],                                    # DeepSpeed 1F1B, flushed every step
    "bll": ["--method", "bll", "--bll_steps_per_call", "1000000"],  # no flush: the pipe drains once per call
    "bll-flush": ["--method", "bll", "--bll_steps_per_call", "1"],  # drained after every step, like 1F1B
}


NANOGPT = "nanogpt"  # nanoGPT's own train.py (bll_bench/nanogpt_arm.py), with --nanogpt_dir


def arm_args(arm: str) -> list[str]:
    """An arm's pretrain.py flags. `bll:VARIANT` and `bll-flush:VARIANT` train that registered
    --bll_variant (the bare arms train the default), so levers can be timed side by side.
    `peer:SCHEDULE` is backprop under one of torch.distributed.pipelining's schedules
    (scripts/peer_pretrain.py --schedule SCHEDULE)."""
    if arm == NANOGPT:
        return []
    base, _, variant = arm.partition(":")
    if base == "peer":
        from bll_bench.peer_pipeline import PEER_SCHEDULES

        if variant not in PEER_SCHEDULES:
            raise UserError(f"unknown peer schedule in arm {arm!r}.",
                            f"choose peer:NAME with NAME from {sorted(PEER_SCHEDULES)}.")
        return ["--schedule", variant]
    if base not in ARMS or (variant and base == "bp"):
        raise UserError(f"unknown arm {arm!r}.", f"choose from {sorted(ARMS)}, bll:VARIANT / bll-flush:VARIANT, "
                        "peer:SCHEDULE, or nanogpt.")
    if not variant:
        return list(ARMS[base])
    get_variant(variant)  # an unknown name fails here, before any launch, listing the registered ones
    return [*ARMS[base], "--bll_variant", variant]


def arm_script(arm: str) -> str:
    return "peer_pretrain.py" if arm.startswith("peer:") else "pretrain.py"


def arm_dir_name(arm: str) -> str:
    return arm.replace(":", "-")


@dataclass
class BenchConfig:
    model: str
    deepspeed_config: str
    out: str
    data: str | None = None
    tokenizer: str = "bpe:4096"
    stages: int = 2
    data_parallel: int = 1
    steps: int = 10
    micro_batches: tuple[int, ...] = (4,)
    sequences_per_step: int = 0  # per replica; 0 = keep the config's micro-batch size for every M
    arms: tuple[str, ...] = ("bp", "bll")
    repeats: int = 3
    warmup_steps: int = 3
    eval_interval: int = 0
    eval_batches: int = 20
    final_eval_batches: int = 8
    link_delays_ms: tuple[float, ...] = (0.0,)  # one-way delay between stages (--link_delay_ms of each run)
    baseline: str = "bp"  # the arm every paired ratio divides by
    nanogpt_dir: str | None = None  # a nanoGPT checkout, for the nanogpt arm
    target_loss: float | str | None = None  # a loss, or "best-bp": the best backprop arm's final held-out loss
    master_port: int = 29750
    extra: tuple[str, ...] = ()


def parse_args(argv: list[str]) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bll_bench compare", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter,
                                epilog="Arguments after `--` are passed to every pretrain.py run.")
    p.add_argument("--model", required=True, help="model spec (models/*.json)")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON; its gradient_accumulation_steps is "
                   "replaced by each --micro_batches value")
    p.add_argument("--out", required=True, help="benchmark folder (runs/, bench.json, bench.md, plots)")
    p.add_argument("--data", default=None, help="corpus, as pretrain.py --data (default: the embedded corpus)")
    p.add_argument("--tokenizer", default="bpe:4096", help="tokenizer, as pretrain.py --tokenizer")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages of every run")
    p.add_argument("--data_parallel", type=int, default=1, help="replicas per stage (ranks = stages x this)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--micro_batches", default="4", help="comma-separated M values")
    p.add_argument("--sequences_per_step", type=int, default=0,
                   help="hold the sequences per step (per replica) fixed across M: micro-batch size = this / M "
                        "(0 = keep the config's micro-batch size, so tokens per step grow with M)")
    p.add_argument("--arms", default="bp,bll", help=f"comma-separated, from {sorted(ARMS)}; bll:VARIANT and "
                   "bll-flush:VARIANT train that --bll_variant; peer:SCHEDULE is backprop under a "
                   "torch.distributed.pipelining schedule (1f1b, interleaved-1f1b, interleaved-zb, zbv, dualpipev)")
    p.add_argument("--repeats", type=int, default=3, help="runs per arm and M, interleaved across the arms")
    p.add_argument("--warmup_steps", type=int, default=3, help="steps left out of throughput")
    p.add_argument("--eval_interval", type=int, default=0, help="held-out evaluation every N steps (0 = end only)")
    p.add_argument("--eval_batches", type=int, default=20, help="held-out batches of each --eval_interval evaluation")
    p.add_argument("--final_eval_batches", type=int, default=8,
                   help="held-out batches of the final evaluation (0 = the whole held-out split)")
    p.add_argument("--target_loss", type=_target, default=None,
                   help="report the wall time to reach this held-out loss; 'best-bp' = the lowest median final "
                        "held-out loss of the backprop arms (bp, peer:*) in this benchmark")
    p.add_argument("--link_delays_ms", default="0", help="comma-separated one-way link delays between stages, "
                   "ms; each run gets one as --link_delay_ms (bll_ds/pipeline/launched/link_delay.py)")
    p.add_argument("--baseline", default="bp", help="the arm the paired ratios divide by")
    p.add_argument("--nanogpt_dir", default=None, help="a clone of https://github.com/karpathy/nanoGPT, for the "
                   "nanogpt arm (its own train.py, run side by side: bll_bench/nanogpt_arm.py)")
    p.add_argument("--master_port", type=int, default=29750, help="the launcher's rendezvous port for every run")
    p.add_argument("--config", default=None, help="a benchmark recipe (recipes/bench/*.yaml): these flags' names "
                   "and values, in JSON or YAML; flags given beside it override it")
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    a = p.parse_args(with_config(p, own))
    arms = tuple(a.arms.split(","))
    for arm in arms:
        arm_args(arm)
    if NANOGPT in arms:
        nanogpt_arm.check_checkout(a.nanogpt_dir)
    return BenchConfig(model=a.model, deepspeed_config=a.deepspeed_config, out=a.out, data=a.data,
                       tokenizer=a.tokenizer, stages=a.stages, data_parallel=a.data_parallel, steps=a.steps,
                       micro_batches=tuple(int(m) for m in a.micro_batches.split(",")), arms=arms,
                       sequences_per_step=a.sequences_per_step, baseline=a.baseline, nanogpt_dir=a.nanogpt_dir,
                       link_delays_ms=tuple(float(d) for d in a.link_delays_ms.split(",")),
                       repeats=a.repeats, warmup_steps=a.warmup_steps, eval_interval=a.eval_interval,
                       eval_batches=a.eval_batches, final_eval_batches=a.final_eval_batches,
                       target_loss=a.target_loss, master_port=a.master_port, extra=tuple(extra))


def _target(text: str) -> float | str:
    if text == BEST_BP:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a loss nor {BEST_BP!r}") from None


BEST_BP = "best-bp"


def is_backprop(arm: str) -> bool:
    return arm == "bp" or arm.startswith("peer:")


def best_backprop_loss(runs: list[dict]) -> float | None:
    """The lowest, over backprop arms and M, of each arm's median final held-out loss."""
    keys = {(r["arm"], r["M"]) for r in runs if is_backprop(r["arm"])}
    medians = [statistics.median(r["val_loss"] for r in runs if (r["arm"], r["M"]) == key) for key in keys]
    return min(medians) if medians else None


# ---- running ------------------------------------------------------------------------------------
def points(cfg: BenchConfig) -> list[tuple[int, float]]:
    """(M, link delay ms) measured, in run order."""
    return [(m, d) for m in cfg.micro_batches for d in cfg.link_delays_ms]


def schedule(cfg: BenchConfig) -> list[tuple[int, int, float, str]]:
    """(repeat, M, link delay ms, arm) in run order: A B A B ..., the arm order reversed every
    other repeat."""
    order = []
    for r in range(cfg.repeats):
        arms = cfg.arms if r % 2 == 0 else tuple(reversed(cfg.arms))
        # nanoGPT has neither micro-batches nor stage links: it runs once per repeat, at the first point.
        order += [(r, m, d, arm) for m, d in points(cfg) for arm in arms
                  if arm != NANOGPT or (m, d) == points(cfg)[0]]
    return order


def run_name(repeat: int, m: int, delay: float, arm: str) -> str:
    link = f"-L{delay:g}ms" if delay else ""
    return f"M{m}{link}-{arm_dir_name(arm)}-r{repeat}"


def ds_config_for(cfg: BenchConfig, micro_batches: int, out: Path) -> Path:
    """The user's DeepSpeed config with M micro-batches per step (train_batch_size derived)."""
    try:
        ds = json.loads(Path(cfg.deepspeed_config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the DeepSpeed config {cfg.deepspeed_config}: {err}.",
                        "pass --deepspeed_config a readable JSON file (ds_configs/*.json).") from err
    ds["gradient_accumulation_steps"] = micro_batches
    ds.pop("train_batch_size", None)
    if cfg.sequences_per_step:
        if cfg.sequences_per_step % micro_batches:
            raise UserError(f"--sequences_per_step {cfg.sequences_per_step} is not divisible by M = {micro_batches}.",
                            "choose micro-batch counts that divide the sequences per step.")
        ds["train_micro_batch_size_per_gpu"] = cfg.sequences_per_step // micro_batches
    path = out / f"ds_config_M{micro_batches}.json"
    atomic_write_text(path, json.dumps(ds, indent=2) + "\n")
    return path


def launch_command(cfg: BenchConfig, arm: str, ds_config: Path, run_dir: Path, delay_ms: float = 0.0) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(cfg.stages * cfg.data_parallel),
           "--master_port", str(cfg.master_port), str(REPO / "scripts" / arm_script(arm)),
           "--model", cfg.model, "--deepspeed_config", str(ds_config), "--stages", str(cfg.stages),
           "--tokenizer", cfg.tokenizer, "--steps", str(cfg.steps), "--out", str(run_dir),
           "--log_interval", "1", "--eval_interval", str(cfg.eval_interval),
           "--eval_batches", str(cfg.eval_batches), "--final_eval_batches", str(cfg.final_eval_batches),
           "--save_interval", "0", "--keep_checkpoints", "1",
           "--throughput_warmup_steps", str(cfg.warmup_steps), "--no-progress", *arm_args(arm)]
    if cfg.data:
        cmd += ["--data", cfg.data]
    if delay_ms:
        cmd += ["--link_delay_ms", f"{delay_ms:g}"]
    return cmd + list(cfg.extra)


def run_one(cfg: BenchConfig, arm: str, ds_config: Path, run_dir: Path, delay_ms: float = 0.0) -> float:
    """Launch one run; returns the launcher's wall seconds. The launcher's output goes to
    run_dir/launch.log (kept next to the run's own outputs)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(cfg, arm, ds_config, run_dir, delay_ms)
    log_path = run_dir.parent / f"{run_dir.name}.launch.log"
    start = time.time()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not (run_dir / names.SUMMARY).is_file():
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise UserError(f"benchmark run {run_dir.name} failed (exit {done.returncode}); last lines of "
                        f"{log_path}:\n{tail}",
                        "fix the cause above and re-run the same command: finished runs are kept.")
    return time.time() - start


# ---- reading a finished run -----------------------------------------------------------------------
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def stage_mfu(stage: dict) -> tuple[float | None, float | None]:
    """A stage's (mfu over the datasheet peak, mfu over the matmul peak measured in the run). A
    summary.json written before mfu_measured_peak existed held the measured-peak figure under mfu."""
    if "mfu_measured_peak" in stage:
        return stage.get("mfu"), stage["mfu_measured_peak"]
    return None, stage.get("mfu")


def read_run(run_dir: Path, warmup_steps: int, target_loss: float | None) -> dict:
    summary = json.loads((run_dir / names.SUMMARY).read_text())
    run_log = _jsonl(run_dir / names.METRICS)
    last_stage = summary["stages"] - 1
    step_s = {m["step"]: m["stage/step_s"] for m in _jsonl(names.stage_metrics(run_dir, last_stage))
              if "stage/step_s" in m}
    tokens = summary["tokens_per_step"]
    steady = [s for step, s in sorted(step_s.items()) if step > warmup_steps]
    # Mean throughput over the steady steps, drains and flushes included (the median in
    # summary.json leaves out the one drain at the end of a BLL call).
    tokens_per_s_mean = tokens * len(steady) / sum(steady) if steady else None
    train_curve, elapsed = [], 0.0
    for step, s in sorted(step_s.items()):
        elapsed += s
        train_curve.append((step, elapsed))
    train_s_at = dict(train_curve)
    losses = [(m["step"], m["train/loss"]) for m in run_log if "train/loss" in m]
    vals = [(m["step"], m["val/loss"], m["time"]) for m in run_log if "val/loss" in m]
    started = summary.get("started_at")
    reached = next(((step, t) for step, loss, t in vals if target_loss is not None and loss <= target_loss), None)
    stages = summary["stages_detail"]
    return {
        "val_loss": summary["val_loss"], "wall_s": summary["wall_s"], "train_wall_s": summary["train_wall_s"],
        "startup_s": summary.get("startup_s"),
        "tokens_per_s": summary["tokens_per_s"], "tokens_per_s_mean": tokens_per_s_mean,
        "step_s_median": summary["step_s_median"], "tokens_per_step": tokens,
        "utilisation": [s["utilisation"] for s in stages], "peak_rss_mb": [s["peak_rss_mb"] for s in stages],
        "activation_peak_mb": [s.get("activation_peak_mb") for s in stages],
        "mfu": [stage_mfu(s)[0] for s in stages], "mfu_measured_peak": [stage_mfu(s)[1] for s in stages],
        "model_gflops_per_s": [s.get("model_gflops_per_s") for s in stages],
        "matmul_peak_gflops": [s.get("matmul_peak_gflops") for s in stages],
        "grads_sent": sum(s["grads_sent"] for s in stages),
        "train_loss": losses, "val": [(step, loss) for step, loss, _ in vals],
        # Held-out loss against seconds since the process started: start-up, evaluations and all.
        "val_wall": [(round(t - started, 2), loss) for _, loss, t in vals] if started else [],
        "train_s_at_step": train_curve,
        "target_step": reached[0] if reached else None,
        "target_train_s": train_s_at.get(reached[0]) if reached else None,
        "target_wall_s": reached[1] - summary["started_at"] if reached and "started_at" in summary else None,
    }


# ---- aggregating ---------------------------------------------------------------------------------
def _spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _per_stage(rows: list[list[float]]) -> list[float | None]:
    return [statistics.median(col) if None not in col else None for col in zip(*rows)]


def aggregate(runs: list[dict], cfg: BenchConfig) -> dict:
    groups = []
    for m, delay in points(cfg):
        for arm in cfg.arms:
            mine = [r for r in runs if r["M"] == m and r.get("link_delay_ms", 0.0) == delay and r["arm"] == arm]
            if not mine:
                continue
            groups.append({"M": m, "link_delay_ms": delay, "arm": arm, "runs": len(mine),
                           **{k: _spread([r.get(k) for r in mine]) for k in
                              ("tokens_per_s", "tokens_per_s_mean", "step_s_median", "val_loss", "wall_s",
                               "launcher_wall_s", "target_wall_s", "target_train_s", "startup_s", "train_wall_s")},
                           **{k: _per_stage([r.get(k) or [None] * len(r["utilisation"]) for r in mine]) for k in
                              ("utilisation", "peak_rss_mb", "activation_peak_mb", "mfu", "mfu_measured_peak")}})
    ratios = []
    baseline = cfg.baseline if cfg.baseline in cfg.arms else None
    for m, delay in points(cfg):
        for arm in cfg.arms:
            if baseline is None or arm == baseline:
                continue
            # Paired by repeat: each run against the baseline run of the same repeat, M and delay.
            pairs = [(r, b) for r in runs for b in runs if r["M"] == b["M"] == m and r["repeat"] == b["repeat"]
                     and r.get("link_delay_ms", 0.0) == b.get("link_delay_ms", 0.0) == delay
                     and r["arm"] == arm and b["arm"] == baseline]
            if pairs:
                ratios.append({"M": m, "link_delay_ms": delay, "arm": arm, "vs": baseline,
                               "tokens_per_s": _spread([r["tokens_per_s"] / b["tokens_per_s"] for r, b in pairs]),
                               "tokens_per_s_mean": _spread([r["tokens_per_s_mean"] / b["tokens_per_s_mean"]
                                                             for r, b in pairs]),
                               "val_loss": _spread([r["val_loss"] / b["val_loss"] for r, b in pairs]),
                               "stage0_activation": _spread([
                                   r["activation_peak_mb"][0] / b["activation_peak_mb"][0] for r, b in pairs
                                   if r["activation_peak_mb"][0] and b["activation_peak_mb"][0]])})
    return {"groups": groups, "ratios": ratios, "delay_retention": delay_retention(runs, cfg)}


def delay_retention(runs: list[dict], cfg: BenchConfig) -> list[dict]:
    """Per arm, M and delay: tokens/s with the delay over tokens/s without it, paired by repeat
    (needs 0 among --link_delays_ms)."""
    rows = []
    for m, delay in points(cfg):
        if delay == 0.0 or 0.0 not in cfg.link_delays_ms:
            continue
        for arm in cfg.arms:
            pairs = [(r, b) for r in runs for b in runs if r["arm"] == b["arm"] == arm and r["M"] == b["M"] == m
                     and r["repeat"] == b["repeat"] and r.get("link_delay_ms") == delay
                     and b.get("link_delay_ms", 0.0) == 0.0]
            if pairs:
                rows.append({"M": m, "link_delay_ms": delay, "arm": arm,
                             "tokens_per_s": _spread([r["tokens_per_s"] / b["tokens_per_s"] for r, b in pairs]),
                             "tokens_per_s_mean": _spread([r["tokens_per_s_mean"] / b["tokens_per_s_mean"]
                                                           for r, b in pairs])})
    return rows


# ---- entry ---------------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    from bll_bench import plots, report  # matplotlib is imported only when a benchmark runs

    cfg = parse_args(argv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ds_configs = {m: ds_config_for(cfg, m, out) for m in cfg.micro_batches}
    order = schedule(cfg)
    runs, finished = [], []
    with tqdm(total=len(order), unit="run", dynamic_ncols=True, file=sys.stderr) as bar:
        for repeat, m, delay, arm in order:
            run_dir = out / "runs" / run_name(repeat, m, delay, arm)
            bar.set_postfix_str(run_dir.name)
            launcher_wall = None
            if not (run_dir / names.SUMMARY).is_file():
                if run_dir.exists():  # a run killed half-way: start it again from scratch
                    shutil.rmtree(run_dir)
                if arm == NANOGPT:
                    run_dir.mkdir(parents=True)
                    launcher_wall = nanogpt_arm.run(nanogpt_arm.check_checkout(cfg.nanogpt_dir), cfg.data or "",
                                                    cfg.steps, cfg.warmup_steps, run_dir,
                                                    run_dir.parent / f"{run_dir.name}.launch.log", cfg.eval_interval)
                else:
                    launcher_wall = run_one(cfg, arm, ds_configs[m], run_dir, delay)
                atomic_write_text(run_dir / "launcher_wall_s.txt", f"{launcher_wall:.2f}\n")
            elif (run_dir / "launcher_wall_s.txt").is_file():
                launcher_wall = float((run_dir / "launcher_wall_s.txt").read_text())
            finished.append((repeat, m, delay, arm, run_dir, launcher_wall))
            bar.update(1)
    target = cfg.target_loss
    if target == BEST_BP:  # needs every run's final loss first
        # The final evaluation as logged (summary.json rounds it), so that arm's own last
        # evaluation reaches the target.
        target = best_backprop_loss([{"arm": arm, "M": m, "val_loss": read_run(d, cfg.warmup_steps, None)["val"][-1][1]}
                                     for _, m, delay, arm, d, _ in finished if not delay])
    for repeat, m, delay, arm, run_dir, launcher_wall in finished:
        runs.append({"repeat": repeat, "M": m, "link_delay_ms": delay, "arm": arm, "run_dir": str(run_dir),
                     "launcher_wall_s": launcher_wall,
                     **read_run(run_dir, cfg.warmup_steps, target)})
    result = {"config": asdict(cfg), "command": "python -m bll_bench compare " + shlex.join(argv),
              "target_loss": target, "runs": runs, **aggregate(runs, cfg)}
    atomic_write_text(out / "bench.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "bench.md", report.markdown(result))
    plots.write_all(result, out)
    print((out / "bench.md").read_text())
    return 0
