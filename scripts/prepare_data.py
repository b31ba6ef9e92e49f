#!/usr/bin/env python
"""Tokenize a corpus once, streamed, into sharded token files for pretrain.py --data tokens:DIR.

    python scripts/prepare_data.py --data corpus.jsonl --text_field content --tokenizer bpe:32000 --out data/tok
    python scripts/prepare_data.py --data HuggingFaceFW/fineweb-edu:sample-10BT \
        --tokenizer path/to/tokenizer.json --out data/fineweb --tokenize_workers 8
    deepspeed --num_gpus 8 scripts/pretrain.py ... --data tokens:data/fineweb

The same command as python -m bll_ds.data.prepare_tokens (its docstring: format, held-out rule,
tokenizer sample, atomic writes).
"""

import sys

import _bootstrap  # noqa: E402,F401  (the checkout on sys.path)

from bll_ds.data.prepare_tokens import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
