"""Run outputs: JSON lines and TensorBoard events, a tqdm progress bar, plain log lines, and
summary.json at the end.

Two kinds of writer, so that logging never needs a collective across stages during training:
- the run log, on the last stage's first replica (it holds the real LM loss): metrics.jsonl, tb/;
- one stage log per stage (first replica): metrics_stage{k}.jsonl, tb/stage{k}/ -- local losses,
  loss terms, busy/idle time, gradient and update norms.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bll_ds.atomic import atomic_write_text


class MetricsLog:
    def __init__(self, jsonl_path: Path, tb_dir: Path, enabled: bool, start_step: int,
                 progress_total: int | None = None):
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only where used

        self._jsonl = open(jsonl_path, "a")
        self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1)
        if progress_total is not None:
            self._bar = tqdm(total=progress_total, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def advance(self, steps: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.update(steps)

    def log(self, step: int, scalars: dict[str, float], echo: bool = True) -> None:
        """One metrics line; keys are TensorBoard tags as they are."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **scalars}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        if echo:
            self.print(f"step {step} " + " ".join(f"{k.replace('/', '_').removeprefix('train_')}={_fmt(v)}"
                                                  for k, v in scalars.items()))

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
