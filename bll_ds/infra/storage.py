"""The run dir must take every checkpoint the run will write: checked before any work, so a
missing permission or a full disk is found at start-up, not at the first save after hours."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bll_ds.infra.errors import UserError

# Weights, AdamW moments and (under bf16) fp32 master weights: what one checkpoint holds per
# parameter, at most, plus the bf16 copy.
CHECKPOINT_BYTES_PER_PARAM = 18


def check_run_dir_storage(run_dir: Path, params: int, keep_checkpoints: int) -> None:
    # Every rank runs this before the process group exists, so it must not create or remove
    # the run dir itself: one rank's clean-up would race another rank's probe. It probes the
    # run dir, or (before the first run) its nearest existing ancestor, where the run will
    # create it, with a private temporary folder per process.
    probe_dir = run_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        _write_probe(probe_dir)
        free = shutil.disk_usage(probe_dir).free
    except OSError as err:
        raise UserError(f"cannot write to the run dir {run_dir}: {err.strerror or err} (in {probe_dir}).",
                        "choose an --out on a writable filesystem with free space "
                        "(check its permissions and `df`).") from None
    # keep_checkpoints complete ones, plus the one being written.
    needed = CHECKPOINT_BYTES_PER_PARAM * params * (keep_checkpoints + 1)
    if free < needed:
        raise UserError(f"the filesystem of {run_dir} has {free / 1e9:.2f} GB free; {keep_checkpoints + 1} "
                        f"checkpoints of this {params / 1e6:.1f}M-parameter model need about {needed / 1e9:.2f} GB.",
                        "free space there, choose an --out on a larger filesystem, or lower --keep_checkpoints.")


def _write_probe(folder: Path) -> None:
    """Write and fsync 4 KiB in a private temporary folder inside `folder`, then remove it: raises
    OSError where `folder` cannot be written. Private per process, so ranks probing at once do
    not disturb each other."""
    probe = Path(tempfile.mkdtemp(prefix=".bll_ds_write_probe.", dir=folder))
    try:
        with open(probe / "probe", "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def check_cache_dir(cache_dir: str) -> None:
    """The tokenized-corpus cache must be a folder this process can create and write, before the run starts."""
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_probe(path)
    except OSError as err:
        raise UserError(f"cannot write to the cache dir {cache_dir}: {err.strerror or err}.",
                        "pass --cache_dir a writable folder (it holds tokenized corpora, shared between runs).") from None
