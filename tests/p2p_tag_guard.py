"""Imported into every rank with --custom_import: fails any point-to-point call that passes a
tag (NCCL ignores tags, so a protocol that needs them breaks on GPUs) and records, per rank, which
calls ran on the default group and which on a group of their own. Written to
$P2P_GUARD_DIR/rank{RANK}.json at exit."""

import atexit
import json
import os
from pathlib import Path

import torch.distributed as tdist

calls = []


def _guard(name, original):
    def call(*args, **kwargs):
        # (tensor, peer, group, tag) as torch.distributed names them, positional or keyword.
        tensor = kwargs.get("tensor", args[0] if args else None)
        group = kwargs.get("group", args[2] if len(args) > 2 else None)
        tag = kwargs.get("tag", args[3] if len(args) > 3 else 0)
        if tag not in (0, None):
            raise AssertionError(f"{name} with tag={tag}: NCCL ignores tags")
        default = group is None or group == tdist.GroupMember.WORLD
        calls.append({"op": name, "default_group": default, "numel": tensor.numel()})
        return original(*args, **kwargs)
    return call


for _name in ("send", "recv", "isend", "irecv"):
    setattr(tdist, _name, _guard(_name, getattr(tdist, _name)))


@atexit.register
def _write():
    out = os.environ.get("P2P_GUARD_DIR")
    if out:
        Path(out, f"rank{os.environ.get('RANK', 'x')}.json").write_text(json.dumps(calls))
