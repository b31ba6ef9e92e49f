"""The nanoGPT arm of the benchmark (bll_bench/nanogpt_arm.py): its checkout check, the parse of
nanoGPT's stdout into the files the harness reads, and (where ../nanoGPT or $NANOGPT_DIR holds a
checkout) a real 30-iteration run of nanoGPT's own train.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bll_bench import compare, nanogpt_arm
from bll_ds.infra.errors import UserError
from helpers import REPO

STDOUT = """tokens per iteration will be: 768
found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
step 0: train loss 4.2874, val loss 4.2823
iter 0: loss 4.2664, time 812.40ms, mfu -100.00%
iter 1: loss 4.0011, time 40.00ms, mfu 0.01%
iter 2: loss 3.8000, time 42.00ms, mfu 0.01%
step 3: train loss 3.5000, val loss 3.6000
iter 3: loss 3.7000, time 300.00ms, mfu 0.01%"""


def test_parse_and_write_give_the_harness_its_files(tmp_path):
    lines = [(1000.0 + i, line) for i, line in enumerate(STDOUT.splitlines())]
    iters, evals = nanogpt_arm.parse(lines)
    assert [it["step"] for it in iters] == [0, 1, 2, 3] and iters[1]["step_s"] == pytest.approx(0.04)
    assert [(ev["step"], ev["val_loss"]) for ev in evals] == [(0, 4.2823), (3, 3.6)]
    nanogpt_arm.write_run(tmp_path, iters, evals, started=999.0, wall=9.5, warmup_steps=1, commit="abc")
    got = compare.read_run(tmp_path, warmup_steps=1, target_loss=3.7)
    assert got["val_loss"] == 3.6 and got["tokens_per_step"] == 768
    assert got["step_s_median"] == pytest.approx(0.042)  # iterations 1-3: the compile/warm-up one left out
    assert got["target_step"] == 3 and got["target_wall_s"] == pytest.approx(1006.0 - 999.0)  # its line, 7th
    assert [s for s, _ in got["train_loss"]] == [1, 2, 3, 4]


def test_a_missing_or_wrong_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="git clone https://github.com/karpathy/nanoGPT"):
        nanogpt_arm.check_checkout(None)
    with pytest.raises(UserError, match="lacks train.py"):
        nanogpt_arm.check_checkout(str(tmp_path))
    with pytest.raises(UserError, match="needs a nanoGPT checkout"):
        compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o", "--arms", "bll,nanogpt"])


def test_nanogpt_runs_once_per_repeat_whatever_the_micro_batch_counts():
    cfg = compare.BenchConfig(model="m", deepspeed_config="d", out="o", arms=("bll", "nanogpt"),
                              micro_batches=(1, 4), repeats=2)
    assert [(r, m, arm) for r, m, _, arm in compare.schedule(cfg)] == [
        (0, 1, "bll"), (0, 1, "nanogpt"), (0, 4, "bll"), (1, 1, "nanogpt"), (1, 1, "bll"), (1, 4, "bll")]


def _checkout() -> Path | None:
    for candidate in (os.environ.get("NANOGPT_DIR"), REPO.parent / "nanoGPT"):
        if candidate and (Path(candidate) / "train.py").is_file():
            return Path(candidate)
    return None


@pytest.mark.skipif(_checkout() is None, reason="no nanoGPT checkout in ../nanoGPT or $NANOGPT_DIR")
def test_nanogpt_own_train_py_runs_as_an_arm(tmp_path, text_corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    wall = nanogpt_arm.run(_checkout(), str(text_corpus), 30, 2, run_dir, tmp_path / "run.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    # nanoGPT runs iterations 0..max_iters: one more update than --max_iters says.
    assert wall > 0 and summary["method"] == "nanogpt" and summary["steps"] == 31
    assert 0 < summary["val_loss"] < 5 and summary["tokens_per_s"] > 0
