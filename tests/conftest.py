import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import REPO, SHARED_TEXT, stop_fork_server  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _fork_server_lifetime():
    """helpers.run_script's fork server starts on the first one-process run; it stops here."""
    yield
    stop_fork_server()


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
