"""One writer per run dir: RUN_DIR/writer.lock, held by the process that writes the run.

Two runs writing one --out interleave their metrics, checkpoints and configs, and both exit 0.
So before anything is written, the writing process (rank 0: it alone writes the run-level files;
the other ranks follow its verdict) creates the lock file with O_CREAT | O_EXCL, which succeeds for
exactly one process even on a shared filesystem, and writes into it who holds it. A second run,
from any launcher, on this host or another, finds the file and stops with one line naming the
holder (host, pid, start time).

A lock whose holder is gone is taken over, with a line that says so:
- on the holder's host, the holder is gone when its pid is not running, or runs another program
  (the pid was reused: the process start time in /proc differs);
- from another host the pid cannot be asked, so the holder keeps the file's mtime fresh: a thread
  touches it every HEARTBEAT_S seconds, and a lock untouched for STALE_AFTER_S is a dead holder's.

The takeover renames the stale file aside before creating a new one, so two runs that find the
same stale lock cannot both take it: one rename fails, and O_EXCL decides between the survivors.
The lock is removed when the run ends, however it ends short of SIGKILL, which the takeover
covers.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path

from bll_ds.infra.errors import UserError
from bll_ds.run import run_dir as names

HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_here(holder: dict) -> bool:
    """On the holder's host: is the holding process still the one running?"""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process with that pid: it exists
    started = _process_start(pid)
    return started is None or holder.get("proc_start") in (None, started)


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}")


class RunDirLock:
    """The held lock of one run dir; `release()` (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path, created_dir: bool):
        self.path, self.created_dir = path, created_dir
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="run-dir-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self.created_dir:
            try:
                self.path.parent.rmdir()  # only if the run wrote nothing else
            except OSError:
                pass

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: Path, say=print) -> RunDirLock:
    """Take RUN_DIR's lock or raise UserError naming its holder. `say` prints the takeover line."""
    run_dir = Path(run_dir)
    created_dir = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to the run dir {run_dir}: {err.strerror}.",
                        "choose an --out on a writable filesystem.") from None
    path = run_dir / names.WRITER_LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _process_start(os.getpid()),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # vanished between the two calls, or is being written: try again
                time.sleep(0.2)
                continue
            stale = _stale_because(holder, path, me["host"])
            if stale is None:
                raise UserError(f"{run_dir} is being written by another run ({describe(holder)}); a run dir has "
                                f"one writer.", f"wait for that run to end or stop it, or choose a new --out. If "
                                f"that process is gone, delete {path}.")
            aside = path.with_name(f"{path.name}.stale.{me['pid']}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another run took it over first: O_EXCL decides
            aside.unlink(missing_ok=True)
            say(f"bll-ds: took over {path} from a run that is gone ({describe(holder)}: {stale})")
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return RunDirLock(path, created_dir)
    raise UserError(f"could not take the lock {path}: it keeps changing hands.",
                    "make sure one run at a time writes to this --out, then start again.")


def _read(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Created but not yet written (the holder is between its open and its write), or cut
        # short by a crash: judge it by its age alone.
        return {"mtime": path.stat().st_mtime} if text == "" else {"unreadable": text[:80]}


def _stale_because(holder: dict, path: Path, host: str) -> str | None:
    """Why the holder is gone, or None while it may still be running."""
    if holder.get("host") == host and "pid" in holder:
        return None if _alive_here(holder) else "no such process on this host"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "the lock was removed"
    if age > STALE_AFTER_S:
        return f"the lock was last refreshed {age / 60:.0f} minutes ago"
    return None
