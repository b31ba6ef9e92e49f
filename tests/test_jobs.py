"""Runs under a scheduler: --resume auto, SIGTERM/SIGUSR1 and
--exit_duration_mins stop with a checkpoint, the resolved configs are saved, a changed --steps
on resume follows the documented rule, bf16 "auto" is decided by a measurement, and the
DeepSpeed config's CSV and W&B monitors get the run log. One-process emulated runs (the same
train loop as a launched one), a few seconds each; where several tests only read a run, it is a
module fixture and each test copies what it changes."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import time

import pytest

from helpers import REPO, launch_failure, read_metrics, run_pretrain, start_script, train_losses


def _ds_config(tmp_path, name="ds.json", **changes):
    cfg = json.loads((REPO / "ds_configs/test-1m.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def _args(out, data, ds, steps=6, method="bp"):
    return ["--model", "models/test-1m.json", "--deepspeed_config", ds, "--tokenizer", "char", "--steps", str(steps),
            "--seq_len", "32", "--stages", "2", "--method", method, "--bll_steps_per_call", "2", "--emulate",
            "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2", "--save_interval", "0",
            "--trace_steps", "0", "--no-measure_matmul_peak", "--data", str(data), "--out", str(out)]


def _ok(result):
    assert result.returncode == 0, launch_failure(result)
    return result


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory, cache_dir, text_corpus):
    """A 6-step run started with --resume auto (nothing to resume yet) and stopped after step 3,
    with its output. Tests copy it before they resume it."""
    folder = tmp_path_factory.mktemp("stopped-at-3")
    out, ds = folder / "run", _ds_config(folder)
    first = _ok(run_pretrain(_args(out, text_corpus, ds) + ["--resume", "auto", "--exit_interval", "3"], None, cache_dir))
    return out, ds, first


def test_resume_auto_starts_then_continues(stopped_at_3, tmp_path, cache_dir, text_corpus):
    stopped, ds, first = stopped_at_3
    assert "stopped after step 3" in first.stdout + first.stderr
    assert (stopped / "checkpoints" / "latest").read_text() == "step_0000003"
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    _ok(run_pretrain(_args(out, text_corpus, ds) + ["--resume", "auto"], None, cache_dir))
    assert sorted(train_losses(out)) == list(range(1, 7))
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 3
    # The resolved configs: every flag with its default filled in, and DeepSpeed's as it got it.
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["steps"] == 6 and run_config["seq_len"] == 32 and run_config["checkpoint"]["resume"] == "auto"
    assert run_config["bll"]["steps_per_call"] == 2 and run_config["stages"] == 2
    ds_saved = json.loads((out / "ds_config.json").read_text())
    assert ds_saved["gradient_accumulation_steps"] == 2 and ds_saved["train_batch_size"] == 4
    assert ds_saved["scheduler"]["params"]["total_num_steps"] == 6


def test_a_changed_steps_on_resume_is_refused_for_a_schedule_that_knows_its_length(stopped_at_3, tmp_path, cache_dir,
                                                                                   text_corpus):
    stopped, ds, _ = stopped_at_3
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    result = run_pretrain(_args(out, text_corpus, ds, steps=10) + ["--resume"], None, cache_dir)
    assert result.returncode == 2
    assert "started for 6 steps" in result.stderr and "--steps 6" in result.stderr, result.stderr[-2000:]


def test_a_constant_schedule_may_be_extended(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    ds = _ds_config(tmp_path, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2}})
    _ok(run_pretrain(_args(out, text_corpus, ds, steps=3), None, cache_dir))
    _ok(run_pretrain(_args(out, text_corpus, ds, steps=5) + ["--resume"], None, cache_dir))
    assert sorted(train_losses(out)) == list(range(1, 6))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_both_stop_signals_are_caught(sig):
    """In this process: the handler notes the signal and the run would stop at the next boundary."""
    import os

    from bll_ds.run.job_control import JobControl

    job = JobControl(exit_duration_mins=0, started=time.time())
    try:
        assert job.stop_reason("cpu") is None
        os.kill(os.getpid(), sig)
        assert job.stop_reason("cpu") == f"a stop signal ({sig.name})"
    finally:
        job.close()
    assert signal.getsignal(sig) is not job._on_signal  # the previous handler is back


def test_a_stop_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, cache_dir, text_corpus):
    """SLURM's --signal=USR1@SECONDS, sent to a running job; the next job resumes it."""
    sig = signal.SIGUSR1
    out = tmp_path / "run"
    ds = _ds_config(tmp_path, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2}})
    proc = start_script(REPO / "scripts/pretrain.py", [*_args(out, text_corpus, ds, steps=100000),
                                                        "--cache_dir", str(cache_dir), "--no-progress"])
    deadline = time.time() + 240
    while (time.time() < deadline and proc.poll() is None
           and not ((out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 3)):
        time.sleep(0.2)
    proc.send_signal(sig)
    output = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"a stop signal ({sig.name})" in output
    stopped = int((out / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 3 <= stopped < 100000 and max(train_losses(out)) == stopped
    # And the next job continues from there.
    _ok(run_pretrain(_args(out, text_corpus, ds, steps=stopped + 2) + ["--resume", "auto"], None, cache_dir))
    assert max(train_losses(out)) == stopped + 2


def test_exit_duration_stops_at_the_first_boundary_past_the_budget(tmp_path, cache_dir, text_corpus):
    out, ds = tmp_path / "run", _ds_config(tmp_path)
    result = _ok(run_pretrain(_args(out, text_corpus, ds, steps=40) + ["--exit_duration_mins", "0.001"], None, cache_dir))
    assert "--exit_duration_mins was reached: stopped after step 1" in result.stdout + result.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_0000001"


def test_bf16_auto_is_decided_by_the_runs_own_measurement(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    ds = _ds_config(tmp_path, bf16={"enabled": "auto"})
    _ok(run_pretrain(_args(out, text_corpus, ds, steps=1), None, cache_dir))
    ds_saved = json.loads((out / "ds_config.json").read_text())
    saved, peaks = ds_saved["bf16"], ds_saved["bf16_auto_measured_gflops"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0
    assert saved["enabled"] is (peaks["bf16"] >= 1.1 * peaks["fp32"])
    assert json.loads((out / "summary.json").read_text())["bf16"] is saved["enabled"]


def _has_wandb() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, cache_dir, text_corpus):
    """A 3-step block-local run with the CSV monitor and (where wandb is installed) W&B offline."""
    folder = tmp_path_factory.mktemp("monitored")
    out = folder / "run"
    sections = {"csv_monitor": {"enabled": True, "output_path": str(folder / "csv"), "job_name": "bll-run"}}
    env = {}
    if _has_wandb():
        sections["wandb"] = {"enabled": True, "project": "bll-ds-test", "group": "s2"}
        env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(folder)}
    ds = _ds_config(folder, **sections)
    _ok(run_pretrain(_args(out, text_corpus, ds, steps=3, method="bll"), None, cache_dir, env=env))
    return out, folder


def test_csv_monitor_gets_the_run_log(monitored):
    out, folder = monitored
    with open(folder / "csv" / "bll-run" / "train_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"]
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert {int(s): float(v) for s, v in rows[1:]} == pytest.approx(train_losses(out))
    assert json.loads((out / "ds_config.json").read_text())["csv_monitor"]["job_name"] == "bll-run"  # as written


def test_wandb_offline_gets_the_block_local_run_log(monitored):
    pytest.importorskip("wandb")
    out, _ = monitored
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    # The offline record holds each logged value JSON-encoded beside its key (W&B's history rows).
    record = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/loss" in record
    for step, loss in train_losses(out).items():
        assert json.dumps(loss).encode() in record, step
