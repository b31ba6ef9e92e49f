#!/bin/bash
# Throughput of BLL's cheap readout on llama-25m, S = 2, 16 sequences per step as M = 1 or 4
# micro-batches. The flags: recipes/bench/throughput-cheap-readout-l25.yaml.
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --config recipes/bench/throughput-cheap-readout-l25.yaml "$@"
