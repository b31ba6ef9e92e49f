"""A fork server for the tests' one-process runs of scripts/*.py (helpers.run_script).

Each `python scripts/pretrain.py ...` pays about 7 s of imports (torch, deepspeed, transformers)
before it does anything; the fast suite starts some thirty of them. This server imports the
trainer's modules once and forks a child per run. Each run is still its own process: it gets its
own arguments, environment, working directory and output files, runs the script as __main__, and
leaves through the interpreter's normal exit (atexit handlers, exit status), so nothing it does
touches pytest's process or another run. A forked run differs from a fresh interpreter's only in
starting with those modules imported, and with the server's str-hash seed (torch's and numpy's
seeds are drawn anew in each run; Python's random module reseeds itself after a fork). The server
only imports: it runs no torch operation, starts no thread and reads no file a run writes. It
then freezes what it imported out of the cycle collector's reach (gc.freeze): without that, a
run's exit spent about a second collecting the preloaded modules' objects, copying their pages.

- the server is started with the environment a plain run gets (helpers.cpu_env()); a run whose
  environment differs in anything but RUNTIME_ENV (variables read when the run starts, never at
  import) is given a fresh interpreter instead (helpers.run_script decides);
- a module that fails to import here is simply imported again by the run, which then fails as a
  fresh interpreter would;
- the imports are those of the server's start (the session's first one-process run), as pytest's
  own are those of its collection: a module edited during a session is not seen by later forks;
- BLL_TEST_FORKSERVER=0 turns the server off: every run is a fresh interpreter.

Protocol, over a Unix socket: one JSON line per request, {"script", "args", "env", "cwd",
"stdout", "stderr"}; the answer is two JSON lines, {"pid"} when the run has started and
{"returncode"} (subprocess's convention: -N for signal N) when it has ended. The server stops
when its standard input closes (pytest ended it, or pytest itself ended).

Each run is a grandchild: a waiter process forks it, reports its pid, waits for it and reports
its status, so the server itself never waits and never holds a run's state.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys

# The trainer's import closure and the checkpoint readers (evaluate.py, export.py, generate.py).
PRELOAD = ("torch", "deepspeed", "deepspeed.comm", "transformers", "bll_ds.run.train", "bll_ds.use.trained_run")

# Variables that no preloaded module should read at import, only the run when it starts: a run may
# set them and still be forked. The server checks this as it imports (_preload) and tells the
# client which of them were read after all; a run that sets one of those gets a fresh interpreter.
RUNTIME_ENV = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "BLL_DS_THREADS", "BLL_DS_INJECT_NONFINITE", "WANDB_MODE", "WANDB_SILENT", "WANDB_DIR",
                         "PYTEST_CURRENT_TEST"})  # pytest sets the last one for each test


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _preload() -> list[str]:
    """Import PRELOAD; return the RUNTIME_ENV variables those imports looked up (there should be
    none). Python-level lookups only (os.environ[...], .get, in, os.getenv); a scan of the whole
    environment (tqdm's, for TQDM_* names, reads every variable as it iterates) is not counted."""
    environ = type(os.environ)
    read: set[str] = set()
    get, contains, iterate = environ.__getitem__, environ.__contains__, environ.__iter__
    scanned = [None]

    def watched_get(self, key):
        if key != scanned[0]:
            read.add(key)
        return get(self, key)

    def watched_contains(self, key):
        read.add(key)
        return contains(self, key)

    def watched_iter(self):
        for key in iterate(self):
            scanned[0] = key
            yield key
        scanned[0] = None

    environ.__getitem__, environ.__contains__, environ.__iter__ = watched_get, watched_contains, watched_iter
    sys.path.insert(0, os.getcwd())  # the checkout, as scripts/pretrain.py puts it on the path
    try:
        for name in PRELOAD:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 -- the run imports it again and reports the error itself
                pass
    finally:
        del sys.path[0]
        environ.__getitem__, environ.__contains__, environ.__iter__ = get, contains, iterate
    return sorted(read & RUNTIME_ENV)


def _serve(path: str):
    """Runs in the server; returns a request only in a run's process (the grandchild)."""
    read_at_import = _preload()
    # The preloaded modules are shared, read-mostly state: frozen, the collector of every run leaves
    # them alone (no traversal, no copy-on-write faults), which is most of a short run's exit.
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    print("ready " + json.dumps(read_at_import), flush=True)
    while True:
        readable, _, _ = select.select([server, sys.stdin], [], [])
        if sys.stdin in readable:  # end of file: pytest is done
            server.close()
            return None
        conn, _ = server.accept()
        line = _read_line(conn)
        if not line.strip():
            conn.close()
            continue
        request = json.loads(line)
        if os.fork() == 0:  # the waiter
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            pid = os.fork()
            if pid == 0:  # the run
                conn.close()
                return request
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                _, status = os.waitpid(pid, 0)
                conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            finally:
                os._exit(0)
        conn.close()


def _become(request: dict) -> None:
    """Turn this forked process into `python SCRIPT ARGS` with the request's environment."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if fd == 2 and request["stderr"] == request["stdout"]:
            os.dup2(1, 2)  # stderr=subprocess.STDOUT
            continue
        target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # A fresh interpreter draws its seeds at start: so does each run (Python's random module
    # reseeds itself after a fork). str hashes keep the server's PYTHONHASHSEED.
    if "torch" in sys.modules:
        sys.modules["torch"].seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    script = os.path.abspath(request["script"])
    sys.argv = [script, *request["args"]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it


if __name__ == "__main__":
    job = _serve(sys.argv[1])
    if job is not None:
        _become(job)
        del job
        import runpy

        # Uncaught exceptions print their traceback and exit 1, SystemExit gives its code, and the
        # interpreter then shuts down as it does after any script.
        runpy.run_path(sys.argv[0], run_name="__main__")
