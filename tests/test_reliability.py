"""Runs that get killed lose nothing: a rank killed with SIGKILL stops the whole launch, and
--resume continues from the last complete checkpoint on exactly the curve of an uninterrupted run."""

import shutil
import subprocess
import time

import psutil
import pytest

from bll_ds.run import checkpoint
from helpers import REPO, VENV_BIN, cpu_env, launch_failure, run_pretrain, train_losses

pytestmark = pytest.mark.launcher

STEPS = 100  # the kill comes right after the first checkpoint (step 20): 80 steps, seconds, to spare
ARGS = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json", "--stages", "2",
        "--tokenizer", "char", "--seq_len", "64", "--steps", str(STEPS), "--save_interval", "20",
        "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "4", "--no-measure_matmul_peak",
        "--seed", "11"]


def _launch(args, cache_dir, port):
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "scripts" / "pretrain.py"), *args, "--cache_dir", str(cache_dir), "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError("rank process not found")


def test_a_rank_killed_mid_run_stops_the_launch_and_resume_matches_an_uninterrupted_run(
        tmp_path, cache_dir, text_corpus):
    straight = tmp_path / "straight"
    done = run_pretrain(ARGS + ["--data", str(text_corpus), "--out", str(straight)], 2, cache_dir, master_port=29661)
    assert done.returncode == 0, launch_failure(done)

    killed = tmp_path / "killed"
    launcher = _launch(ARGS + ["--data", str(text_corpus), "--out", str(killed)], cache_dir, 29662)
    victim = _rank_process(launcher, 1)
    deadline = time.time() + 120
    while checkpoint.latest_complete(killed) is None and time.time() < deadline:
        time.sleep(0.05)
    victim.kill()  # SIGKILL: no handler, no cleanup, as an OOM killer or a lost node does
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    # The launcher names the first rank it sees stopped: the killed one (-9), or the survivor, which
    # may notice its peer gone first and exits 3 with the lost-connection line.
    assert ("exits with return code = -9" in output
            or ("lost its connection to another rank" in output and "exits with return code = 3" in output)), \
        output[-3000:]
    tag, saved = checkpoint.latest_complete(killed)
    assert 20 <= saved["step"] < STEPS
    # A checkpoint write killed half-way leaves a folder without complete.json; it never becomes
    # `latest`, and --resume removes it before loading.
    partial = killed / "checkpoints" / checkpoint.tag_for(STEPS - 1)
    shutil.copytree(killed / "checkpoints" / tag, partial)
    (partial / checkpoint.MARKER).unlink()
    assert checkpoint.latest_complete(killed)[0] == tag

    resumed = run_pretrain(ARGS + ["--data", str(text_corpus), "--out", str(killed), "--resume"], 2, cache_dir,
                           master_port=29663)
    assert resumed.returncode == 0, launch_failure(resumed)
    assert "removed incomplete checkpoint folders" in resumed.stdout + resumed.stderr
    want, got = train_losses(straight), train_losses(killed)
    assert max(got) == STEPS
    # Steps after the checkpoint were trained twice (before the kill and after the resume); the
    # second time must reproduce the uninterrupted run exactly, as must everything else.
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
