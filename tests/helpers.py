"""Shared helpers for tests that run the trainer as users do: through scripts/pretrain.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from forkserver import RUNTIME_ENV

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


def sent_decoder_layer(config, seed: int = 5):
    """A downstream stage's first decoder layer as it would send it, trained away from its
    initialisation (random weights): what the overlap and averaged readouts receive."""
    import torch

    from bll_ds.modeling.layers import DecoderLayer

    torch.manual_seed(seed)
    layer = DecoderLayer(config, layer_idx=1)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return layer


def cpu_env() -> dict:
    """The environment of every process a test starts. BLL_DS_THREADS=1: an emulated run takes
    one intra-op thread, as each launched rank does, instead of every core; on a busy machine a
    two-thread pool waits at each barrier for a descheduled thread (measured here: 0.5 s instead
    of 0.045 s per step of test-1m, the same losses)."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", BLL_DS_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_pretrain(args: list[str], ranks: int | None, cache_dir: Path, timeout: int = 600,
                 master_port: int | None = None, env: dict | None = None, fresh: bool = False,
                 runner: bool = False) -> subprocess.CompletedProcess:
    """`scripts/pretrain.py ARGS` as one process (ranks=None) or as `ranks` CPU ranks.

    - ranks=None: one plain process, forked by run_script's server unless fresh=True;
    - ranks=N: N ranks started as torchrun starts them (launch_ranks), forked by the same server;
    - ranks=N, runner=True: through the deepspeed runner (`deepspeed --num_gpus N`), for the
      tests of the runner's own path. It costs about 15 s more per launch: the runner and its
      per-node launcher import deepspeed in turn before the ranks start their own imports."""
    script = [str(REPO / "scripts" / "pretrain.py"), *args, "--cache_dir", str(cache_dir), "--no-progress"]
    if ranks is None:
        return run_script(script[0], script[1:], env=env, timeout=timeout, fresh=fresh)
    try:
        if not runner:
            return launch_ranks(script[0], script[1:], ranks, master_port or 29500, env=env, timeout=timeout)
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks)]
        if master_port:
            cmd += ["--master_port", str(master_port)]
        return subprocess.run(cmd + script, cwd=REPO, env={**cpu_env(), **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port=master_port or 29500)


def launch_ranks(script: str | Path, args: list[str], ranks: int, master_port: int, env: dict | None = None,
                 timeout: int = 600) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as `ranks` ranks on this host with the variables torchrun gives each
    (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as the deepspeed
    runner's per-node launcher supervises them: when one rank exits non-zero the others are
    terminated, and the launch returns that rank's exit status. stdout and stderr are every rank's,
    rank by rank (a launcher interleaves them)."""
    procs = []
    try:
        for rank in range(ranks):
            rank_env = {**(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                        "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}
            procs.append(start_script(script, args, env=rank_env, merge_stderr=False))
        deadline = time.monotonic() + timeout
        while True:
            running = [p.poll() is None for p in procs]
            returncode = next((p.returncode for p in procs if p.returncode), 0)
            if returncode or not any(running):
                break
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(script), *args], timeout)
            time.sleep(0.05)
        if returncode:  # a failed rank's peers wait in a collective that will never complete
            for p in procs:
                p.send_signal(signal.SIGTERM)
            grace = time.monotonic() + 10
            while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                time.sleep(0.05)
            for p in procs:
                p.kill()
        outputs = [p.communicate() for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
            p.communicate()
        raise
    return subprocess.CompletedProcess([str(script), *args], returncode, "".join(o for o, _ in outputs),
                                       "".join(e for _, e in outputs))


SHM = Path("/dev/shm")


def remove_shm_buffers(port: int | None = None, newer_than: float | None = None) -> list[str]:
    """DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) leaves a 66 MB segment per
    rank in /dev/shm, named by the master address and port, and never unlinks it: a suite of ~60
    launch ports kept 11 GB of this machine's 24 GB of memory. Remove this user's segments for
    `port` (or those written since `newer_than`) that no live process maps."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    candidates = [p for p in (SHM.glob(prefix + "*") if SHM.is_dir() else [])
                  if (port is None or p.name.rsplit("_", 2)[-2] == str(port))
                  and (newer_than is None or p.stat().st_mtime >= newer_than)]
    if not candidates:
        return []
    in_use = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            in_use.update(line.split()[-1] for line in maps.read_text().splitlines() if str(SHM) in line)
        except OSError:  # the process ended, or is not ours to read
            continue
    removed = []
    for path in candidates:
        if str(path) not in in_use:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


# ---- one-process runs of scripts/*.py, forked from a server that has done the imports ----------
#
# tests/forkserver.py says what a forked run shares with a fresh interpreter (only the imports)
# and when a run gets a fresh interpreter instead. BLL_TEST_FORKSERVER=0: always a fresh one.

def run_script(script: str | Path, args: list[str], env: dict | None = None, timeout: int = 600,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in the repository with cpu_env() (plus `env`), as subprocess.run with
    capture_output=True, text=True would run it. fresh=True: a fresh interpreter whatever the
    server could do (for a test of the interpreter's own start-up)."""
    proc = start_script(script, args, env=env, fresh=fresh, merge_stderr=False)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:  # a timeout or ^C: the run goes with it, as under subprocess.run
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_script(script: str | Path, args: list[str], env: dict | None = None, fresh: bool = False,
                 merge_stderr: bool = True):
    """`python SCRIPT ARGS` started and not waited for: a subprocess.Popen, or a ForkedRun with the
    same pid, poll, send_signal and communicate. merge_stderr: stderr goes to stdout's stream."""
    full_env = {**cpu_env(), **(env or {})}
    cmd = [sys.executable, str(script), *args]
    server = None if fresh else _fork_server()
    if server is None or not server.accepts(full_env):
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True)
    return server.start(cmd, full_env, merge_stderr)


class ForkedRun:
    """One run forked by tests/forkserver.py; its output goes to files until it ends."""

    def __init__(self, args: list[str], conn, folder: str, merge_stderr: bool):
        self.args, self._conn, self._folder, self._merged = args, conn, folder, merge_stderr
        self.returncode = None
        self.pid = json.loads(self._line(None))["pid"]

    def _line(self, timeout: float | None) -> str:
        self._conn.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the fork server's waiter closed the connection without an answer")
            data += chunk
        return data.decode()

    def poll(self):
        if self.returncode is None:
            try:
                self.returncode = json.loads(self._line(0.0))["returncode"]
            except (socket.timeout, BlockingIOError):
                return None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it exited after poll asked, before its waiter reported
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:

        if self.returncode is None:
            try:
                self.returncode = json.loads(self._line(timeout))["returncode"]
            except socket.timeout:
                self.kill()
                self.returncode = json.loads(self._line(None))["returncode"]
                out, err = self._outputs()
                raise subprocess.TimeoutExpired(self.args, timeout, out, err) from None
        out, err = self._outputs()
        self._conn.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        return out, err

    def wait(self, timeout: float | None = None) -> int:
        self.communicate(timeout)
        return self.returncode

    def _outputs(self) -> tuple[str, str | None]:
        read = lambda name: Path(self._folder, name).read_text(errors="replace")  # noqa: E731
        return read("stdout"), (None if self._merged else read("stderr"))


class _ForkServer:
    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="bll-forkserver-")
        self.path = os.path.join(self.folder, "socket")
        self.env = cpu_env()
        with open(os.path.join(self.folder, "server.log"), "w") as log:
            # It stops when its stdin closes: at close(), or when this process ends in any way.
            self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkserver.py"), self.path],
                                         cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True)
        word, _, read = self.proc.stdout.readline().partition(" ")
        self.ready = word == "ready"
        self.runtime_env = RUNTIME_ENV - set(json.loads(read) if self.ready else [])

    def alive(self) -> bool:
        return self.ready and self.proc.poll() is None

    def accepts(self, env: dict) -> bool:
        changed = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        return changed <= self.runtime_env

    def start(self, cmd: list[str], env: dict, merge_stderr: bool) -> ForkedRun:
        folder = tempfile.mkdtemp(prefix="run-", dir=self.folder)
        out = os.path.join(folder, "stdout")
        request = {"script": cmd[1], "args": cmd[2:], "env": env, "cwd": str(REPO), "stdout": out,
                   "stderr": out if merge_stderr else os.path.join(folder, "stderr")}
        for name in {request["stdout"], request["stderr"]}:
            Path(name).touch()  # a run killed before it opens them has said nothing
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        conn.sendall(json.dumps(request).encode() + b"\n")
        return ForkedRun(cmd, conn, folder, merge_stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_SERVER: _ForkServer | None = None


def _fork_server() -> _ForkServer | None:
    """The session's server (started on first use, stopped by conftest at the session's end), or
    None where BLL_TEST_FORKSERVER=0 or it could not start (then runs get fresh interpreters)."""
    global _SERVER
    if os.environ.get("BLL_TEST_FORKSERVER", "1") == "0":
        return None
    if _SERVER is None or not _SERVER.alive():
        if _SERVER is not None:
            _SERVER.close()
        _SERVER = _ForkServer()
        if not _SERVER.ready:
            _SERVER.close()
            _SERVER = None
    return _SERVER


def stop_fork_server() -> None:
    global _SERVER
    if _SERVER is not None:
        _SERVER.close()
        _SERVER = None


# The two launched 2-stage runs that several test files only read (conftest's session fixtures
# launched_bp_run and launched_bll_run; tests/test_launcher.py resumes copies of them, so its own
# launches use the same LAUNCH_COMMON). bll: --final_eval_batches 0, the whole held-out split, so
# that scripts/evaluate.py's default reproduces the run's val_loss (tests/test_use_model.py).
# --no-measure_matmul_peak: nothing here reads MFU; the measurement in launched runs is covered by
# tests/test_bench_compare.py and tests/test_variant_registry.py (about 1.5 s per launch).
LAUNCH_COMMON = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
                 "--method", "bp", "--tokenizer", "char", "--seq_len", "64", "--log_interval", "1",
                 "--eval_interval", "10", "--eval_batches", "4", "--final_eval_batches", "16",
                 "--no-measure_matmul_peak", "--seed", "7"]
LAUNCHED_BP_ARGS = LAUNCH_COMMON + ["--stages", "2", "--steps", "30", "--save_interval", "10"]
LAUNCHED_BLL_ARGS = LAUNCH_COMMON + ["--method", "bll", "--bll_variant", "prototype", "--stages", "2", "--steps", "30",
                                     "--save_interval", "10", "--bll_steps_per_call", "8", "--final_eval_batches", "0"]
LAUNCHED_STEPS = 30


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
