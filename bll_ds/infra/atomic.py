"""Atomic file writes, so a run killed mid-write never leaves a half file that a later run reuses."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`.

    The temporary file sits in the same folder so `os.replace` is a same-filesystem rename (atomic
    on POSIX). On any error the temporary file is removed and `path` is left untouched.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(str(path), text.encode())
