#!/bin/bash
# Slow links: one-way delays between the two stages (--link_delay_ms in every run).
# The flags: recipes/bench/slow-links-nanogpt.yaml and slow-links-l25.yaml.
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --config recipes/bench/slow-links-nanogpt.yaml
.venv/bin/python -m bll_bench.calibrate results/slow-links-nanogpt
.venv/bin/python -m bll_bench compare --config recipes/bench/slow-links-l25.yaml
