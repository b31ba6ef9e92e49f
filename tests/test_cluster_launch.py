"""Ranks from every common launcher, tables on NCCL-safe channels, and a clear error for a busy
port: what a real cluster needs (docs/results/reliability.md).

The rank mapping is checked on the environments the launchers set; two real launches check the
rest on CPU: torchrun with 2 processes (the table traffic watched by tests/p2p_tag_guard.py,
which fails any tagged point-to-point call), and two plain processes given only Open MPI's
variables, as `mpirun -np 2` (or `deepspeed --launcher openmpi`) starts them.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from bll_ds.infra import distributed
from bll_ds.infra.errors import UserError
from helpers import REPO, VENV_BIN, cpu_env, launch_failure, run_script

RUN = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json", "--method", "bll",
       "--bll_variant", "prototype", "--tokenizer", "char", "--seq_len", "32", "--stages", "2", "--steps", "4",
       "--bll_steps_per_call", "2", "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2",
       "--save_interval", "0", "--trace_steps", "0", "--no-measure_matmul_peak", "--no-progress"]


def test_a_plain_process_is_a_world_of_one():
    env = {}
    assert distributed.launch_env(env) == (0, 1)
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    # Inside an sbatch script (SLURM_PROCID set, no srun step): still one process, not the
    # allocation's 16 tasks waiting for 15 that never start.
    assert distributed.launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}) == (0, 1)


def test_torchrun_and_the_deepspeed_runner_ranks_are_kept():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29999"}
    assert distributed.launch_env(env) == (3, 4)
    assert (env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("1", "node7", "29999")


@pytest.mark.parametrize("launcher_env, expected", [
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "MASTER_ADDR": "10.0.0.2"}, ("5", "8", "1", "10.0.0.2")),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "h0"}, ("2", "4", "0", "h0")),
    ({"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
      "SLURM_STEP_NODELIST": "gpu[003-010,012],login1"}, ("9", "16", "1", "gpu003")),
])
def test_mpi_and_srun_ranks_come_from_the_launchers_variables(launcher_env, expected):
    env = dict(launcher_env)
    assert distributed.launch_env(env) == (int(expected[0]), int(expected[1]))
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == expected
    assert env["MASTER_PORT"] == "29500"


def test_mpi_without_a_master_address_names_the_fix(monkeypatch):
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: None)  # no mpi4py
    with pytest.raises(UserError, match="MASTER_ADDR") as err:
        distributed.launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert "mpi4py" in err.value.fix
    # With mpi4py present, DeepSpeed's own discovery is left to find it (RANK stays unset).
    monkeypatch.setattr(distributed.importlib.util, "find_spec", lambda name: object())
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
    assert distributed.launch_env(env) == (1, 2) and "RANK" not in env


@pytest.mark.parametrize("nodelist, first", [("node01", "node01"), ("a[7-9]", "a7"), ("gpu[003,005-006],x", "gpu003"),
                                             ("login1,login2", "login1")])
def test_first_slurm_host(nodelist, first):
    assert distributed.first_slurm_host(nodelist) == first


def _finished(out, result):
    assert result.returncode == 0, launch_failure(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == 2 and len(summary["stages_detail"]) == 2
    return summary


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, cache_dir, text_corpus):
    root = tmp_path_factory.mktemp("torchrun")
    guard = root / "p2p"
    guard.mkdir()
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29761",
           str(REPO / "scripts" / "pretrain.py"), *RUN, "--data", str(text_corpus), "--out", str(root / "run"),
           "--cache_dir", str(cache_dir), "--custom_import", str(REPO / "tests" / "p2p_tag_guard.py")]
    result = subprocess.run(cmd, cwd=REPO, env={**cpu_env(), "P2P_GUARD_DIR": str(guard)}, capture_output=True,
                            text=True, timeout=600)
    return root / "run", result, guard


@pytest.mark.launcher
def test_torchrun_launches_a_two_stage_pipeline(torchrun_run):
    out, result, _ = torchrun_run
    summary = _finished(out, result)
    assert [s["stage"] for s in summary["stages_detail"]] == [0, 1]


@pytest.mark.launcher
def test_no_point_to_point_call_relies_on_a_tag(torchrun_run):
    """p2p_tag_guard raised on any tagged call (the run would have failed); here: the tables went
    upstream on a group of their own, and the activations downstream on the default group."""
    out, result, guard = torchrun_run
    _finished(out, result)
    calls = {rank: json.loads((guard / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    table_numel = 0
    for rank, ops in calls.items():
        own = [c for c in ops if not c["default_group"]]
        assert own, f"rank {rank}: no table traffic on a group of its own"
        table_numel = table_numel or own[0]["numel"]
    assert {c["op"] for c in calls[1] if not c["default_group"]} == {"isend"}    # stage 1 sends tables
    assert {c["op"] for c in calls[0] if not c["default_group"]} == {"recv"}     # stage 0 receives them
    assert len([c for c in calls[1] if not c["default_group"]]) == 5             # P_0 .. P_4
    assert all(c["numel"] != table_numel for c in calls[0] if c["default_group"] and c["op"] == "isend")


@pytest.mark.launcher
def test_mpi_style_ranks_launch_a_two_stage_pipeline(tmp_path, cache_dir, text_corpus):
    """Two plain processes that know only Open MPI's variables, as mpirun starts them."""
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        env = {**cpu_env(), "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
               "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29762"}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "scripts" / "pretrain.py"), *RUN,
                                       "--data", str(text_corpus), "--out", str(out), "--cache_dir", str(cache_dir)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-3000:] for o in outputs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"] == 2 and summary["dp"] == 1


def test_a_port_in_use_names_master_port(tmp_path, cache_dir, text_corpus):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = run_script(REPO / "scripts" / "pretrain.py", [*RUN, "--stages", "1", "--data", str(text_corpus),
                                                               "--out", str(tmp_path / "run"), "--cache_dir",
                                                               str(cache_dir)], env=env, timeout=300)
    assert result.returncode == 2, launch_failure(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(errors) == 1 and f"port {port}" in errors[0] and "--master_port" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
