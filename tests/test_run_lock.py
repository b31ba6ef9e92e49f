"""One writer per run dir (bll_ds/run/run_lock.py): a second writer is refused naming the holder,
a dead holder's lock is taken over with a line that says so, on this host by its pid and from
another host by the lock's age, and the lock goes when the run ends."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from bll_ds.infra.errors import UserError
from bll_ds.run import run_lock
from bll_ds.run.run_dir import WRITER_LOCK
from helpers import launch_failure, start_script, REPO, run_script


def _write_holder(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / WRITER_LOCK).write_text(json.dumps(holder) + "\n")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock.acquire(run_dir) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError) as err:
            run_lock.acquire(run_dir)
        assert f"pid {os.getpid()} on {socket.gethostname()}, started {holder['started']}" in str(err.value)
        assert "one writer" in err.value.problem and "choose a new --out" in err.value.fix
    assert not run_dir.exists()  # the lock was all it held: created, then gone


def test_release_keeps_a_run_dir_that_holds_more_than_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    lock = run_lock.acquire(run_dir)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_a_dead_holder_on_this_host_is_taken_over_with_a_line(tmp_path):
    run_dir = tmp_path / "run"
    pid = _dead_pid()
    _write_holder(run_dir, host=socket.gethostname(), pid=pid, started="2026-01-01T00:00:00+00:00")
    said = []
    with run_lock.acquire(run_dir, say=said.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"took over {run_dir / WRITER_LOCK}" in said[0] and f"pid {pid}" in said[0]
    assert "no such process" in said[0]


def test_a_reused_pid_is_not_the_holder(tmp_path):
    """The holder's pid now runs another program: its start time differs, so the lock is stale."""
    run_dir = tmp_path / "run"
    _write_holder(run_dir, host=socket.gethostname(), pid=os.getpid(), proc_start="1", started="then")
    said = []
    run_lock.acquire(run_dir, say=said.append).release()
    assert len(said) == 1


def test_another_hosts_lock_is_judged_by_its_age(tmp_path):
    run_dir = tmp_path / "run"
    _write_holder(run_dir, host="elsewhere.example", pid=1, started="earlier")
    with pytest.raises(UserError, match="pid 1 on elsewhere.example, started earlier"):
        run_lock.acquire(run_dir)
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(run_dir / WRITER_LOCK, (old, old))
    said = []
    run_lock.acquire(run_dir, say=said.append).release()
    assert len(said) == 1 and "last refreshed 11 minutes ago" in said[0]


def test_the_holder_keeps_its_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    lock = run_lock.acquire(tmp_path / "run")
    old = time.time() - 3600
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.path.stat().st_mtime < 60
    lock.release()


TINY = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json", "--emulate",
        "--tokenizer", "char", "--seq_len", "32", "--stages", "2", "--log_interval", "1", "--eval_interval", "0",
        "--final_eval_batches", "2", "--no-measure_matmul_peak", "--no-progress"]


def test_a_second_run_into_the_same_out_is_refused_and_the_first_is_unharmed(tmp_path, cache_dir, text_corpus):
    """Two emulated runs into one --out, the second started while the first trains: the second stops
    with one line naming the first, and the first's log holds each step once."""
    run_dir = tmp_path / "run"
    args = TINY + ["--steps", "60", "--save_interval", "2", "--data", str(text_corpus), "--cache_dir",
                   str(cache_dir), "--out", str(run_dir)]
    first = start_script(REPO / "scripts" / "pretrain.py", args)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the second could start"
    second = run_script(REPO / "scripts" / "pretrain.py", args)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-2000:]
    assert second.returncode == 2, launch_failure(second)
    lines = [line for line in second.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(lines) == 1 and "is being written by another run" in lines[0] and "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 61))
    assert not (run_dir / WRITER_LOCK).exists()


@pytest.mark.launcher
def test_a_second_launch_into_the_same_out_is_refused(tmp_path, cache_dir, text_corpus):
    """The same through the launcher: rank 0 holds the lock and every rank of the second launch
    stops with its verdict, before the first launch's files are touched."""
    import threading

    from helpers import run_pretrain

    run_dir = tmp_path / "run"
    args = [a for a in TINY if a != "--emulate"] + ["--steps", "60", "--save_interval", "2", "--data",
                                                    str(text_corpus), "--out", str(run_dir)]
    results = {}
    first = threading.Thread(target=lambda: results.update(
        first=run_pretrain(args, 2, cache_dir, master_port=29648)))
    first.start()
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").is_file() and time.time() < deadline and first.is_alive():
        time.sleep(0.1)
    assert first.is_alive(), "the first launch ended before the second could start"
    second = run_pretrain(args, 2, cache_dir, master_port=29649)
    first.join(timeout=300)
    assert results["first"].returncode == 0, launch_failure(results["first"])
    assert second.returncode == 2, launch_failure(second)
    lines = [line for line in second.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert lines and all("is being written by another run" in line for line in lines), second.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, 61))
