#!/usr/bin/env python
"""Scale rehearsal of one pipeline stage on this machine's CPU (see bll_bench/rehearse.py).

    python scripts/rehearse_stage.py --model models/llama-1b.json --stages 8 --json rehearsal.json
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed is imported for LayerSpec only

from bll_bench.rehearse import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
