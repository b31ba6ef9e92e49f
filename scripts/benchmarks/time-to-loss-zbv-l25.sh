#!/bin/bash
# Time to a target loss against torch's ZBV zero-bubble schedule, llama-25m, S = 2, 400 steps.
# The flags: recipes/bench/time-to-loss-zbv-l25.yaml. Re-running continues where it stopped
# (finished runs are kept); REPEATS=2 adds the second, reversed-order repeat.
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --config recipes/bench/time-to-loss-zbv-l25.yaml ${REPEATS:+--repeats $REPEATS} "$@"
