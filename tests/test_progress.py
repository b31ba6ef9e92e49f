"""The progress bar moves every optimizer step, and start-up says what it is doing as it happens."""

from __future__ import annotations

import json

import pytest
import torch

from bll_ds.metrics.log import MetricsLog
from bll_ds.modeling import load_model_spec
from bll_ds.pipeline.emulated.emulator import EmulatedPipeline
from bll_ds.pipeline.step_record import StepRecord
from bll_ds.run.config import BLLConfig
from bll_ds.run.ds_config import DsSettings
from helpers import REPO, launch_ranks, remove_shm_buffers, run_script

SPEC, DS_CONFIG = "models/test-1m.json", "ds_configs/test-1m.json"


def test_the_bar_moves_one_step_per_record_with_loss_and_recent_tokens_per_s(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", tmp_path / "tb", True, start_step=4, progress_total=10, tokens_per_step=100)
    for step, step_s in ((5, 0.5), (6, 1.5)):
        log.advance(StepRecord(step=step, loss=2.5 + step, step_s=step_s, busy_s=step_s, idle_s=0.0, lr=1e-3))
    assert log._bar.n == 6
    assert log._bar.postfix == "loss=8.5000, tok_s=100"  # 200 tokens in 2 s
    log.close()


def _pipeline(method: str) -> EmulatedPipeline:
    ds_config = json.loads((REPO / DS_CONFIG).read_text())
    ds_config["bf16"] = {"enabled": False}
    ds = DsSettings(config=ds_config, data_parallel=1, micro_batch_size=2, micro_batches=2, steps=4)
    return EmulatedPipeline(method, load_model_spec(REPO / SPEC), 2, ds, seed=5, bll=BLLConfig())


@pytest.mark.parametrize("method", ["bll", "bp"])
def test_the_emulator_reports_each_step_as_it_ends(method):
    pipe = _pipeline(method)
    vocab = load_model_spec(REPO / SPEC).vocab_size

    def batch_fn(step_index, m, micro_batches):
        tokens = torch.randint(vocab, (2, 9), generator=torch.Generator().manual_seed(10 * step_index + m))
        return tokens[:, :-1], tokens[:, 1:]

    seen = []
    pipe.start_feedback(0)
    records = pipe.train_steps(0, 3, batch_fn, on_step=lambda r: seen.append((r.step, len(seen))))
    assert seen == [(1, 0), (2, 1), (3, 2)]  # one call per step, in order, as the step ends
    assert [r.step for r in records[1]] == [1, 2, 3]


def test_start_up_says_what_it_does_before_the_first_step(tmp_path, cache_dir, text_corpus):
    args = ["--model", SPEC, "--deepspeed_config", DS_CONFIG, "--emulate", "--tokenizer", "char", "--seq_len", "16",
            "--stages", "2", "--steps", "2", "--eval_interval", "0", "--final_eval_batches", "1",
            "--no-measure_matmul_peak", "--no-progress", "--data", str(text_corpus), "--cache_dir", str(cache_dir),
            "--out", str(tmp_path / "run")]
    done = run_script(REPO / "scripts" / "pretrain.py", args)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("bll-ds:")]
    assert lines[0].startswith("bll-ds: [") and "checking the configs" in lines[0]
    assert "tokenizer char, then tokenizing" in lines[1]
    assert "building the emulated pipeline" in lines[2] and "2 stages" in lines[2]
    assert lines[3].startswith("bll-ds: bll/")  # the run's header, then training


@pytest.mark.launcher
def test_the_launched_bar_moves_inside_an_engine_call(tmp_path, cache_dir, text_corpus):
    """Two launched ranks, four BLL steps in one engine call: the last stage's bar shows each step as
    it ends, not the call's four at once (TQDM_MININTERVAL=0 redraws on every update)."""
    args = ["--model", SPEC, "--deepspeed_config", DS_CONFIG, "--tokenizer", "char", "--seq_len", "16",
            "--stages", "2", "--steps", "4", "--bll_steps_per_call", "4", "--eval_interval", "0",
            "--final_eval_batches", "1", "--no-measure_matmul_peak", "--trace_steps", "0", "--data",
            str(text_corpus), "--cache_dir", str(cache_dir), "--out", str(tmp_path / "run")]
    try:
        done = launch_ranks(REPO / "scripts" / "pretrain.py", args, 2, 29765, env={"TQDM_MININTERVAL": "0"})
    finally:
        remove_shm_buffers(port=29765)
    assert done.returncode == 0, done.stderr[-3000:]
    drawn = [n for n in range(1, 5) if f"{n}/4 [" in done.stderr]
    assert drawn == [1, 2, 3, 4]
