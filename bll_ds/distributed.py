"""Process-group set-up and the few collectives the trainer itself needs."""

from __future__ import annotations

import os
import socket

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from bll_ds.errors import UserError


def launch_env() -> tuple[int, int]:
    """(rank, world_size) as set by the deepspeed launcher. A plain `python scripts/pretrain.py`
    is a world of one, so single-process runs (and tests) need no launcher."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


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
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)


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
