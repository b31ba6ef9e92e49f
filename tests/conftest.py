import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (LAUNCHED_BLL_ARGS, LAUNCHED_BP_ARGS, REPO, SHARED_TEXT, launch_failure,  # noqa: E402
                     remove_shm_buffers, run_pretrain, stop_fork_server)


@pytest.fixture(scope="session", autouse=True)
def _fork_server_lifetime():
    """helpers.run_script's fork server starts on the first one-process run; it stops here."""
    yield
    stop_fork_server()


@pytest.fixture(scope="session", autouse=True)
def _no_shm_buffers_left_behind():
    """run_pretrain removes a launch's DeepSpeed /dev/shm segments when it ends; this catches the
    launches started otherwise (torchrun, MPI-style ranks, the bench harness, scripts/evaluate.py)."""
    started = time.time()
    yield
    remove_shm_buffers(newer_than=started - 1)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """Real text: Tiny Shakespeare from ../shared/data, or (where that folder is absent) a
    corpus of the same kind cut from this interpreter's standard library sources."""
    if SHARED_TEXT.is_file():
        return SHARED_TEXT
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("argparse.py", "textwrap.py", "difflib.py"))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def one_thread():
    """One intra-op thread, as a launched rank has: the meters and planners compare per-rank
    allocations, and a multi-threaded pool can change which kernels run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- launched runs that several files only read (tests marked `launcher` only) ------------------

def _launched(tmp_path_factory, cache_dir, text_corpus, name, args, port) -> Path:
    """Through the deepspeed runner, the path users take; the other launches fork their ranks
    (helpers.run_pretrain)."""
    out = tmp_path_factory.mktemp(name) / "run"
    result = run_pretrain(args + ["--data", str(text_corpus), "--out", str(out)], 2, cache_dir, master_port=port,
                          runner=True)
    assert result.returncode == 0, launch_failure(result)
    return out


@pytest.fixture(scope="session")
def launched_bp_run(tmp_path_factory, cache_dir, text_corpus) -> Path:
    """Backprop, 2 launched stages, 30 steps, a checkpoint every 10 (helpers.LAUNCHED_BP_ARGS):
    read by tests/test_launcher.py and tests/test_emulator.py."""
    return _launched(tmp_path_factory, cache_dir, text_corpus, "launched-bp", LAUNCHED_BP_ARGS, 29611)


@pytest.fixture(scope="session")
def launched_bll_run(tmp_path_factory, cache_dir, text_corpus) -> Path:
    """Block-local learning (prototype feedback, 8 steps per call), 2 launched stages, 30 steps,
    a checkpoint every 10, the final loss on the whole held-out split (helpers.LAUNCHED_BLL_ARGS):
    read by tests/test_launcher.py, tests/test_emulator.py and tests/test_use_model.py."""
    return _launched(tmp_path_factory, cache_dir, text_corpus, "launched-bll", LAUNCHED_BLL_ARGS, 29621)
