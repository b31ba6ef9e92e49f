"""Process-group set-up and the few collectives the trainer itself needs."""

from __future__ import annotations

import importlib.util
import os
import re
import socket

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from bll_ds.infra.errors import UserError


DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's default rendezvous port

# Rank, world size and local rank as each kind of launcher sets them, in order of precedence.
# torchrun and the deepspeed runner's pdsh/local launch set RANK themselves; Open MPI's mpirun
# (also `deepspeed --launcher openmpi`), MPICH/Intel MPI (PMI_*), PMIx and srun set their own.
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    # SLURM_STEP_NUM_TASKS is set inside an srun step only, so a plain `python` in an sbatch
    # script (whose allocation may hold many tasks) stays a world of one.
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),
)


def launch_env(environ=None) -> tuple[int, int]:
    """(rank, world_size) of this process, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT set in `environ` (default os.environ) for torch's env:// rendezvous.

    - RANK already set (torchrun, the deepspeed runner): used as it is.
    - An MPI or SLURM launch (mpirun, srun, `deepspeed --launcher openmpi|slurm|mpich`): the
      ranks come from the launcher's own variables, the way DeepSpeed's MPI discovery reads them.
      MASTER_ADDR: as set, else the first host of the SLURM step's node list; where neither
      exists, DeepSpeed's own discovery (mpi4py, rank 0's address) fills it in at init, and
      without mpi4py the run stops here with the fix.
    - None of these (a plain `python scripts/pretrain.py`): a world of one on a free local port.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env:
        env.setdefault("LOCAL_RANK", "0")
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    launcher = next((names for names in _LAUNCHER_VARS if names[0] in env and names[1] in env), None)
    if launcher is None or int(env[launcher[1]]) == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        return 0, 1
    rank_var, size_var, local_var = launcher
    rank, world = int(env[rank_var]), int(env[size_var])
    local = env.get(local_var)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local if local is not None else rank))
    env.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if nodes:
            env["MASTER_ADDR"] = first_slurm_host(nodes)
        elif importlib.util.find_spec("mpi4py") is None:
            raise UserError(f"this is rank {rank} of {world} started by an MPI launcher ({rank_var}), and no "
                            f"MASTER_ADDR says where rank 0 listens.",
                            "export it to every rank (mpirun -x MASTER_ADDR=<rank 0's host> -x MASTER_PORT=29500 "
                            "...), or pip install mpi4py so DeepSpeed's MPI discovery finds it.")
        else:
            del env["RANK"]  # deepspeed.init_distributed then runs its mpi4py discovery
    return rank, world


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-010,012],login1' -> 'gpu003'. (As
    `scontrol show hostnames` would print first, without needing scontrol on the node.)"""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}.", "export MASTER_ADDR=<rank 0's host>.")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


# What the communication libraries raise on a rank whose peer has gone (gloo, then NCCL).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
              "remote process exited or there was a network error")


def peer_lost(err: BaseException) -> str | None:
    """The library's words if `err` says a peer rank has gone, else None."""
    return next((text for text in _PEER_LOST if text in str(err)), None)


def init(all_cores: bool = False) -> None:
    """all_cores: this process is the whole job (the one-process emulator), so its intra-op pool
    takes every core unless BLL_DS_THREADS says otherwise."""
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # One intra-op thread per rank: N ranks share the machine's cores, and oversubscribed
        # OpenMP pools make every stage slower and the timings meaningless.
        default = str(os.cpu_count() or 1) if all_cores else "1"
        torch.set_num_threads(max(1, int(os.environ.get("BLL_DS_THREADS", default))))
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    except Exception as err:
        text = str(err)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise UserError(f"port {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is already in "
                            f"use, so rank 0 cannot listen there (another run on this machine?).",
                            "pass a free port: deepspeed --master_port 29501 ..., torchrun --master_port 29501 ..., "
                            "or export MASTER_PORT.", rank_local=True) from None
        raise


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        torch.distributed.destroy_process_group()


def agree_on_errors(fn, *args, **kwargs):
    """Run fn on this rank; if it raises UserError on any rank, raise it on every rank.

    Without this, a bad checkpoint shard seen by one rank leaves the others waiting forever in
    the next collective.
    """
    result, message = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as err:
        message = (err.problem, err.fix)
    messages = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(messages, message)
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise UserError(*first)
    return result


def rank0_then_broadcast(fn, *args, **kwargs):
    """Run fn on rank 0 only and hand its (picklable) result, or its UserError, to every rank."""
    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except UserError as err:
            payload = [("error", (err.problem, err.fix))]
    torch.distributed.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise UserError(*value)
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
