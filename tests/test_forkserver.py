"""helpers.run_script's fork server (tests/forkserver.py): a forked run sees the process a fresh
`python SCRIPT` would (arguments, path, environment, signal handlers, threads, torch's defaults),
exits the same way (status, atexit handlers, an uncaught exception's traceback), and changes of
the environment beyond the variables it may take are given a fresh interpreter."""

import json
import signal

import pytest

import helpers
from helpers import REPO, run_script, start_script

PROBE = REPO / "tests" / "forkserver_probe.py"


def _seen(result):
    return json.loads(result.stdout.splitlines()[0])


@pytest.fixture(scope="module")
def server():
    server = helpers._fork_server()
    if server is None:
        pytest.skip("BLL_TEST_FORKSERVER=0: every run is a fresh interpreter")
    return server


def test_a_forked_run_sees_what_a_fresh_one_sees(server):
    env = {"RANK": "0", "MASTER_PORT": "29999"}
    forked, again = run_script(PROBE, ["3"], env=env), run_script(PROBE, ["3"], env=env)
    fresh = run_script(PROBE, ["3"], env=env, fresh=True)
    assert forked.returncode == fresh.returncode == 3
    seeds = {_seen(r).pop("torch_seed") for r in (forked, again, fresh)}
    assert len(seeds) == 3  # each run draws its own, as a fresh interpreter does
    assert _seen(forked) | {"torch_seed": 0} == _seen(fresh) | {"torch_seed": 0}
    assert _seen(forked)["name"] == "__main__" and _seen(forked)["env"]["RANK"] == "0"
    assert forked.stderr == fresh.stderr == "atexit ran\n"


def test_an_uncaught_exception_is_a_traceback_and_status_1(server):
    forked = run_script(PROBE, ["raise"])
    assert forked.returncode == 1
    assert "Traceback" in forked.stderr and "RuntimeError: probe failed on purpose" in forked.stderr
    assert forked.stderr.rstrip().endswith("atexit ran")


def test_a_signal_ends_a_forked_run_as_it_ends_a_process(server, tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('up', flush=True)\ntime.sleep(600)\n")
    proc = start_script(script, [])
    assert isinstance(proc, helpers.ForkedRun) and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    with pytest.raises(helpers.subprocess.TimeoutExpired):
        run_script(script, [], timeout=1)


def test_only_the_runtime_variables_may_differ(server):
    assert server.runtime_env == helpers.RUNTIME_ENV  # no preloaded module read one at import
    assert server.accepts(helpers.cpu_env() | {"RANK": "1", "WANDB_MODE": "offline"})
    assert not server.accepts(helpers.cpu_env() | {"HF_HUB_OFFLINE": "0"})
    assert not server.accepts({k: v for k, v in helpers.cpu_env().items() if k != "DS_ACCELERATOR"})
    assert isinstance(start_script(PROBE, ["0"], env={"TORCH_LOGS": "+dynamo"}), helpers.subprocess.Popen)
