"""Run outputs on rank 0: metrics.jsonl (one line per log step), TensorBoard events in tb/,
a tqdm progress bar, plain log lines, and summary.json at the end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bll_ds.atomic import atomic_write_text


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool):
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and rank 0 only

        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def step_done(self, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.update(1)

    def log(self, step: int, scalars: dict[str, float], echo: bool = True) -> None:
        """Write one metrics line; keys with '/' become TensorBoard tags as they are."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **scalars}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            if value is not None:
                self._tb.add_scalar(key, value, step)
        if echo:
            text = " ".join(f"{k.replace('/', '_').removeprefix('train_')}={_fmt(v)}"
                            for k, v in scalars.items() if not k.startswith("stage"))
            self.print(f"step {step} {text}")

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
