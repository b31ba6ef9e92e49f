"""Imported first by the scripts here: the checkout on sys.path (they run without an install),
and DeepSpeed's CPU accelerator chosen up front where there is no CUDA (the model layers import
deepspeed, whose accelerator probing is slow and noisy otherwise)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
