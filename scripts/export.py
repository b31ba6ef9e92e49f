#!/usr/bin/env python
"""Export a run as a Hugging Face model folder that transformers loads offline.

    python scripts/export.py runs/pretrain exports/pretrain
    python -c "from transformers import AutoModelForCausalLM, AutoTokenizer; \\
        m = AutoModelForCausalLM.from_pretrained('exports/pretrain'); \\
        t = AutoTokenizer.from_pretrained('exports/pretrain')"

Writes config.json, model.safetensors (the forward network only), the tokenizer
(tokenizer.json, tokenizer_config.json), bll_ds_export.json (source run and step) and, for
block-local runs, bll_feedback/stage{k}.safetensors: each stage's feedback block, kept apart
because it is not part of the model that generates text.

--dtype sets the saved weights' dtype: fp32 (default) saves them as trained; bf16 or fp16 halves
the folder. transformers writes it into config.json ("dtype") and from_pretrained loads the
weights in it unless told otherwise (dtype=...).
"""

import argparse
import json
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (the checkout on sys.path; CPU accelerator without CUDA)

from bll_ds.infra.cli_types import DefaultsHelpFormatter, at_least  # noqa: E402
from bll_ds.infra.errors import UserError  # noqa: E402
from bll_ds.use.devices import DTYPES  # noqa: E402
from bll_ds.use.trained_run import export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="the run to export: a pretrain.py --out folder")
    p.add_argument("out_dir", help="the new model folder (must not exist)")
    p.add_argument("--step", type=at_least(0), default=None, help="checkpoint step to export; None = the latest complete one")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="dtype of the saved weights (recorded in config.json); fp32 = as trained")
    args = p.parse_args(argv)
    try:
        info = export(Path(args.run_dir), Path(args.out_dir), args.step, DTYPES[args.dtype])
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
