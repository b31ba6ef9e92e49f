"""Shared helpers for tests that run the trainer as users do: through scripts/pretrain.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VENV_BIN = Path(sys.executable).parent


TINY_SEQ, TINY_VOCAB, TINY_HIDDEN = 6, 11, 8  # tiny_model_config's context, vocabulary, width


def tiny_model_config(folder: Path):
    """test-1m's family shrunk to TINY_HIDDEN units, 2 heads, a TINY_SEQ context and a TINY_VOCAB
    vocabulary: small enough to check a local loss by hand (the readout unit tests)."""
    from bll_ds.modeling import load_model_spec

    spec = json.loads((REPO / "models/test-1m.json").read_text())
    spec.update(hidden_size=TINY_HIDDEN, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=TINY_SEQ)
    (folder / "tiny.json").write_text(json.dumps(spec))
    return load_model_spec(folder / "tiny.json", vocab_size=TINY_VOCAB)


def cpu_env() -> dict:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_pretrain(args: list[str], ranks: int | None, cache_dir: Path, timeout: int = 600,
                 master_port: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """ranks=None: one plain process; otherwise the deepspeed launcher with that many CPU ranks."""
    script = [str(REPO / "scripts" / "pretrain.py"), *args, "--cache_dir", str(cache_dir), "--no-progress"]
    if ranks is None:
        cmd = [sys.executable, *script]
    else:
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks)]
        if master_port:
            cmd += ["--master_port", str(master_port)]
        cmd += script
    return subprocess.run(cmd, cwd=REPO, env={**cpu_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def launch_failure(result: subprocess.CompletedProcess, tail: int = 2000) -> str:
    """Why a launch failed: the first error line of each rank plus the tail. A C++ stack trace
    from one rank can fill the whole tail and hide the Python error that started it."""
    lines = (result.stdout + result.stderr).splitlines()
    first_errors = [line for line in lines
                    if re.search(r"(Error|Exception|error:)", line) and "frame #" not in line][:12]
    return ("first errors:\n" + "\n".join(first_errors) + "\n--- tail ---\n"
            + (result.stdout[-tail:] + result.stderr[-tail:]))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def stage_losses(run_dir: Path, stages: int) -> dict[tuple[int, int], float]:
    """(stage, step) -> that stage's logged loss, from every metrics_stage{k}.jsonl of a run."""
    out = {}
    for k in range(stages):
        for line in (run_dir / f"metrics_stage{k}.jsonl").read_text().splitlines():
            m = json.loads(line)
            if "stage/loss" in m:
                out[(k, m["step"])] = m["stage/loss"]
    return out
