#!/usr/bin/env python
"""Pretrain a causal LM on a DeepSpeed pipeline.

    deepspeed --num_gpus 2 scripts/pretrain.py --model models/nanogpt-char.json \
        --deepspeed_config ds_configs/nanogpt-char.json --method bp --stages 2 \
        --data ../shared/data/tinyshakespeare.txt --tokenizer char --steps 2000 --out runs/anchor

Without CUDA the same command runs on the CPU (DeepSpeed's CPU accelerator, gloo).
"""

import time

STARTED = time.time()

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bll_ds.run.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
