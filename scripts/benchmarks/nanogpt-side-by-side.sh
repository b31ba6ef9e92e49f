#!/bin/bash
# nanoGPT's own train.py side by side with BLL, the same 2000 steps of 12 x 64 tokens.
# The flags: recipes/bench/nanogpt-side-by-side.yaml; NANOGPT_DIR and REPEATS override it.
cd "$(dirname "$0")/../.."
.venv/bin/python -m bll_bench compare --config recipes/bench/nanogpt-side-by-side.yaml   ${NANOGPT_DIR:+--nanogpt_dir $NANOGPT_DIR} ${REPEATS:+--repeats $REPEATS} "$@"
