"""Run logs: JSON lines and TensorBoard events, a tqdm progress bar, plain log lines.

Two kinds of writer, so that logging never needs a collective across stages during training:
- the run log, on the last stage's first replica (it holds the real LM loss): metrics.jsonl, tb/;
- one stage log per stage (first replica): metrics_stage{k}.jsonl, tb/stage{k}/ -- local losses,
  loss terms, busy/idle time, gradient and update norms.
The run log also feeds the DeepSpeed config's CSV and W&B monitors (bll_ds/metrics/monitors.py).
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm



class MetricsLog:
    def __init__(self, jsonl_path: Path, tb_dir: Path, enabled: bool, start_step: int,
                 progress_total: int | None = None, monitors: list | None = None, tokens_per_step: int = 0):
        self.enabled = enabled
        self._bar = None
        self._tokens_per_step = tokens_per_step
        self._recent_step_s = collections.deque(maxlen=10)
        self.monitors = (monitors or []) if enabled else []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow, and only where used

        self._jsonl = open(jsonl_path, "a")
        self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1)
        if progress_total is not None:
            # Redrawn at most every second, unless TQDM_MININTERVAL says otherwise (tqdm reads it).
            self._bar = tqdm(total=progress_total, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, **({} if "TQDM_MININTERVAL" in os.environ else {"mininterval": 1.0}))

    def advance(self, record) -> None:
        """One optimizer step done (its StepRecord): the bar moves, with the step's loss and the
        tokens/s of the last ten steps (one step alone is noisy)."""
        if self._bar is None:
            return
        self._recent_step_s.append(record.step_s)
        tokens_per_s = self._tokens_per_step * len(self._recent_step_s) / max(sum(self._recent_step_s), 1e-9)
        self._bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self._bar.update(1)

    def log(self, step: int, scalars: dict[str, float], echo: bool = True) -> None:
        """One metrics line; keys are TensorBoard tags as they are."""
        if not self.enabled:
            return
        scalars = {k: v for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **scalars}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        for monitor in self.monitors:
            monitor.write(step, scalars)
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
        for monitor in self.monitors:
            monitor.close()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)



def log_step_records(records, log: MetricsLog | None, stage_log: MetricsLog, tokens_per_step: int) -> None:
    """The run log (last stage; None for the emulator's other stages) gets the LM loss and
    throughput; each stage log its own terms.
    A skipped step is logged with `skipped` 1 and no loss (NaN is not JSON)."""
    for r in records:
        loss = r.loss if math.isfinite(r.loss) else None
        skipped = 1 if r.nonfinite else None
        if log is not None:
                log.log(r.step, {"train/loss": loss, "train/skipped": skipped, "train/lr": r.lr,
                             "train/tokens_per_s": tokens_per_step / r.step_s,
                             "train/tokens_seen": r.step * tokens_per_step})
        stage_log.log(r.step, {"stage/loss": loss, "stage/skipped": skipped, "stage/step_s": r.step_s,
                               "stage/busy_s": r.busy_s, "stage/idle_s": r.idle_s, "stage/grad_norm": r.grad_norm,
                               "stage/update_norm": r.update_norm,
                               **{f"stage/{k}": v for k, v in r.terms.items()}}, echo=False)
