"""--on_nonfinite: what the training loop does with a step the engine did not apply.

The engine never applies a non-finite step (bll_ds/pipeline/nonfinite.py decides and drops it).
This decides whether the run goes on: 'stop' ends it with a message naming the step, the stage
and the last good checkpoint; 'skip' goes on, and stops only when a stage skips more than
--max_consecutive_skips steps in a row, which is divergence, not a bad batch.
"""

from __future__ import annotations

from pathlib import Path

from bll_ds.infra.errors import UserError
from bll_ds.pipeline import nonfinite
from bll_ds.run import checkpoint


def describe(record, stage: int) -> str:
    where = f"at step {record.step} on stage {stage}"
    return {
        nonfinite.LOSS: f"the training loss is non-finite ({record.loss}) {where}",
        nonfinite.GRADS: f"the gradients are non-finite {where} (loss {record.loss:.4g})",
        nonfinite.DEEPSPEED: f"DeepSpeed's optimizer found a non-finite gradient norm {where}",
        nonfinite.PEER: f"the step is non-finite on another rank that shares stage {stage}'s update, {where}",
    }[record.nonfinite]


class NonFinitePolicy:
    def __init__(self, mode: str, max_consecutive_skips: int, stage: int, run_dir: Path, announce,
                 ds_config_path: str = "the DeepSpeed config"):
        self.ds_config_path = ds_config_path  # named in the advice: a resumed run uses its values
        self.mode = mode
        self.limit = max_consecutive_skips
        self.stage = stage
        self.run_dir = run_dir
        self.announce = announce  # prints one line from this stage (its first replica)
        self.in_a_row: list[int] = []  # steps of the current run of skips

    def check(self, records) -> None:
        for record in records:
            if record.nonfinite is None:
                self.in_a_row = []
                continue
            if self.mode == "stop":
                raise UserError(f"{describe(record, self.stage)}; its update was not applied.",
                                f"{self._restart()} {self._lower()}, or pass --on_nonfinite skip to drop such "
                                f"steps and go on.",
                                rank_local=True)
            self.in_a_row.append(record.step)
            self.announce(f"bll-ds: warning: {describe(record, self.stage)}; update skipped "
                          f"({len(self.in_a_row)} in a row, limit {self.limit}).")
            if len(self.in_a_row) > self.limit:
                raise UserError(f"stage {self.stage} skipped {len(self.in_a_row)} steps in a row "
                                f"(steps {self.in_a_row[0]}..{self.in_a_row[-1]}): the run has diverged.",
                                f"{self._restart()} {self._lower()} (or raise --max_consecutive_skips).",
                                rank_local=True)

    def _lower(self) -> str:
        # Takes effect from the first resumed step: bll_ds/run/resumed_settings.py.
        return (f"after lowering optimizer.params.lr (or gradient_clipping) in {self.ds_config_path} (the resumed "
                f"steps use the new values)")

    def _restart(self) -> str:
        last = checkpoint.latest_complete(self.run_dir)
        return (f"resume (--resume) from the last good checkpoint, {last[0]}," if last
                else "start again (the run has no complete checkpoint yet)")
