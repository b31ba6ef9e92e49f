"""Run by tests/test_forkserver.py, forked and in a fresh interpreter: prints what a script sees of
its process as JSON on stdout, says so on stderr at exit, and exits with the status it is given
(or raises, with "raise")."""

import atexit
import json
import os
import signal
import sys
import threading

import torch

atexit.register(lambda: print("atexit ran", file=sys.stderr, flush=True))
print(json.dumps({
    "name": __name__,
    "file": __file__,
    "argv": sys.argv,
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "env": {k: os.environ.get(k) for k in ("RANK", "MASTER_PORT", "DS_ACCELERATOR", "OMP_NUM_THREADS",
                                           "PYTHONUNBUFFERED", "BLL_TEST_FORKSERVER")},
    "stdin_readable": sys.stdin.read() == "",
    "threads": threading.active_count(),
    "torch_threads": torch.get_num_threads(),
    "torch_seed": torch.initial_seed(),
    "grad_enabled": torch.is_grad_enabled(),
    "default_dtype": str(torch.get_default_dtype()),
    "handlers": {s.name: str(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1,
                                                            signal.SIGCHLD, signal.SIGPIPE)},
    "dist_initialized": torch.distributed.is_available() and torch.distributed.is_initialized(),
    "stdout_write_through": sys.stdout.write_through,
    "recursion_limit": sys.getrecursionlimit(),
}), flush=True)
if sys.argv[1] == "raise":
    raise RuntimeError("probe failed on purpose")
sys.exit(int(sys.argv[1]))
