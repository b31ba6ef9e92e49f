"""`--device` and `--dtype` for the scripts that use a trained run (evaluate, export, generate).

Training places each rank through DeepSpeed's accelerator; these scripts are plain PyTorch, so
they take the device as a flag: CUDA where there is one (in bf16 where the GPU computes it), else
the CPU in fp32. Asking for what the machine cannot do fails at once, in one line naming the fix,
not in the middle of loading a model.
"""

from __future__ import annotations

import argparse
import os

import torch

from bll_ds.infra.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="'cpu', 'cuda' or 'cuda:N'; None = cuda where available (under the launcher: "
                             "the rank's LOCAL_RANK GPU), else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="of the weights and activations; None = bf16 on a GPU that computes it "
                             "natively, else fp32")


def resolve_device(name: str | None, local_rank: int | None = None) -> torch.device:
    """The device asked for (None: CUDA where available). `local_rank`: under the launcher,
    a bare "cuda" means this rank's own GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not a device this script runs on.", "pass cpu, cuda or cuda:N.")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        why = (f"this PyTorch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else f"no CUDA device is visible (CUDA_VISIBLE_DEVICES={visible})")
        raise UserError(f"--device {name} was asked for, but {why}.",
                        "pass --device cpu (or omit --device), or run on a machine with an NVIDIA GPU and a "
                        "CUDA build of PyTorch.")
    if device.index is None:
        device = torch.device("cuda", local_rank or 0)
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"so there is no cuda:{device.index}.",
                        f"pass --device cuda:N with N below {torch.cuda.device_count()}, or --device cuda.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype asked for (None: bf16 on a GPU that computes it natively, else fp32; a GPU
    that only emulates bf16, such as a V100, is far slower in it than in fp32)."""
    cuda = device.type == "cuda"
    if name is None:
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported(including_emulation=True):
        raise UserError(f"--dtype bf16 was asked for, but {torch.cuda.get_device_name(device)} has no bf16.",
                        "pass --dtype fp16 or --dtype fp32.")
    return DTYPES[name]
