"""nanoGPT's own train.py as an arm of the `compare` benchmark (`--arms nanogpt --nanogpt_dir DIR`).

The outside reference trainer, run side by side with ours on the same machine: not a re-implementation,
and not vendored. DIR is a checkout of https://github.com/karpathy/nanoGPT (measured at commit
NANOGPT_COMMIT; any later one runs too, and summary.json records which):

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT && git -C ../nanoGPT checkout 3adf61e1

Each run gets a work folder inside its run dir: links to DIR's train.py, model.py, configurator.py
and config/, and data/shakespeare_char/ with a copy of DIR's prepare.py and of --data as
input.txt (so prepare.py does not download anything), prepared there. Then nanoGPT trains with
the CPU recipe of ../shared/data/README.md (the recipe of its own README, with --max_iters and
--lr_decay_iters set to the benchmark's --steps):

    python -u train.py config/train_shakespeare_char.py RECIPE --max_iters=N --lr_decay_iters=N \
        --eval_interval=E     (the benchmark's --eval_interval where it divides N, else N)

Its stdout is read line by line and timestamped as it arrives: `iter n: loss x, time t ms` gives
the step times (metrics_stage0.jsonl) and train losses, `step n: train loss a, val loss b` its
held-out evaluations (metrics.jsonl, with the time each was printed). summary.json has what the
harness reads: the final held-out loss (nanoGPT's estimate: eval_iters=20 random batches of the
last 10% of the file), tokens/s from the median iteration time, process wall time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.errors import UserError
from bll_ds.run import run_dir as names

NANOGPT_COMMIT = "3adf61e1"  # the snapshot the documented figures were measured with
BATCH_SIZE, BLOCK_SIZE = 12, 64
RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", f"--block_size={BLOCK_SIZE}",
          f"--batch_size={BATCH_SIZE}", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
ITER = re.compile(r"^iter (\d+): loss ([0-9.]+), time ([0-9.]+)ms")
EVAL = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)")
NEEDED = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py",
          "data/shakespeare_char/prepare.py")


def check_checkout(nanogpt_dir: str | None) -> Path:
    if not nanogpt_dir:
        raise UserError("the nanogpt arm needs a nanoGPT checkout.",
                        "git clone https://github.com/karpathy/nanoGPT ../nanoGPT and pass --nanogpt_dir ../nanoGPT.")
    root = Path(nanogpt_dir).resolve()
    missing = [name for name in NEEDED if not (root / name).is_file()]
    if missing:
        raise UserError(f"{root} is not a nanoGPT checkout: it lacks {', '.join(missing)}.",
                        "pass --nanogpt_dir a clone of https://github.com/karpathy/nanoGPT.")
    return root


def commit_of(root: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def prepare_workdir(root: Path, data: str, work: Path) -> None:
    """nanoGPT's files linked into `work`, the corpus prepared as its shakespeare_char dataset."""
    corpus = Path(data)
    if not corpus.is_file():
        raise UserError(f"the nanogpt arm reads one text file as its corpus; {data} is not a file.",
                        "pass --data ../shared/data/tinyshakespeare.txt (and --tokenizer char).")
    dataset = work / "data" / "shakespeare_char"
    dataset.mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "model.py", "configurator.py", "config"):
        (work / name).symlink_to(root / name)
    shutil.copy(root / "data/shakespeare_char/prepare.py", dataset / "prepare.py")
    shutil.copy(corpus, dataset / "input.txt")
    done = subprocess.run([sys.executable, "prepare.py"], cwd=dataset, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"nanoGPT's prepare.py failed in {dataset}:\n{done.stderr[-2000:]}",
                        "check that --data is a readable text file.")


def command(steps: int, eval_interval: int) -> list[str]:
    """The recipe, N iterations, evaluated every eval_interval (the benchmark's, or only at the end:
    nanoGPT evaluates when iter % eval_interval == 0, so it must divide N for a final evaluation)."""
    every = eval_interval if eval_interval and steps % eval_interval == 0 else steps
    return [sys.executable, "-u", "train.py", "config/train_shakespeare_char.py", *RECIPE,
            f"--max_iters={steps}", f"--lr_decay_iters={steps}", f"--eval_interval={every}", "--out_dir=out"]


def parse(lines: list[tuple[float, str]]) -> tuple[list[dict], list[dict]]:
    """(iterations, evaluations) from timestamped stdout lines."""
    iters, evals = [], []
    for stamp, line in lines:
        if m := ITER.match(line):
            iters.append({"step": int(m[1]), "time": stamp, "loss": float(m[2]), "step_s": float(m[3]) / 1000})
        elif m := EVAL.match(line):
            evals.append({"step": int(m[1]), "time": stamp, "train_loss": float(m[2]), "val_loss": float(m[3])})
    return iters, evals


def run(root: Path, data: str, steps: int, warmup_steps: int, run_dir: Path, log_path: Path,
        eval_interval: int = 0) -> float:
    """Train nanoGPT once into run_dir; returns the wall seconds of its process."""
    work = run_dir / "nanogpt"
    work.mkdir(parents=True)
    prepare_workdir(root, data, work)
    cmd = command(steps, eval_interval)
    lines: list[tuple[float, str]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.time()
    with open(log_path, "w") as log:
        log.write(f"cd {work} && {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            log.write(line)
        code = proc.wait()
    wall = time.time() - started
    iters, evals = parse(lines)
    if code != 0 or not evals or not iters:
        tail = "\n".join(line for _, line in lines[-15:])
        raise UserError(f"nanoGPT's train.py failed in {work} (exit {code}); last lines:\n{tail}",
                        "fix the cause above and re-run the same command: finished runs are kept.")
    write_run(run_dir, iters, evals, started, wall, warmup_steps, commit_of(root))
    return wall


def write_run(run_dir: Path, iters: list[dict], evals: list[dict], started: float, wall: float,
              warmup_steps: int, commit: str | None) -> None:
    """The files the harness reads (compare.read_run), in pretrain.py's formats."""
    tokens_per_step = BATCH_SIZE * BLOCK_SIZE
    # nanoGPT numbers its first iteration 0; ours start at 1.
    with open(names.stage_metrics(run_dir, 0), "w") as f:
        for it in iters:
            f.write(json.dumps({"step": it["step"] + 1, "stage/step_s": it["step_s"]}) + "\n")
    with open(run_dir / names.METRICS, "w") as f:
        rows = [(it["step"] + 1, it["time"], {"train/loss": it["loss"]}) for it in iters]
        rows += [(ev["step"], ev["time"], {"val/loss": ev["val_loss"]}) for ev in evals]
        for step, stamp, scalars in sorted(rows, key=lambda r: r[1]):
            f.write(json.dumps({"step": step, "time": round(stamp, 3), **scalars}) + "\n")
    warm = [it["step_s"] for it in iters if it["step"] >= warmup_steps] or [it["step_s"] for it in iters]
    median = statistics.median(warm)
    # "steps": the iterations it ran. nanoGPT runs iterations 0..max_iters, one more than asked.
    summary = {"method": "nanogpt", "nanogpt_commit": commit, "stages": 1, "dp": 1,
               "steps": len(iters), "tokens_per_step": tokens_per_step,
               "started_at": round(started, 3), "wall_s": round(wall, 2),
               "train_wall_s": round(iters[-1]["time"] - iters[0]["time"] + iters[0]["step_s"], 2),
               "startup_s": round(iters[0]["time"] - iters[0]["step_s"] - started, 2),
               "tokens_per_s": round(tokens_per_step / median, 1), "step_s_median": round(median, 5),
               "val_loss": evals[-1]["val_loss"], "val_loss_kind": "nanoGPT's estimate: 20 random val batches",
               "stages_detail": [{"stage": 0, "utilisation": None, "peak_rss_mb": None, "activation_peak_mb": None,
                                  "mfu": None, "mfu_measured_peak": None, "model_gflops_per_s": None,
                                  "matmul_peak_gflops": None, "grads_sent": 0}]}
    atomic_write_text(run_dir / names.SUMMARY, json.dumps(summary, indent=2) + "\n")
