#!/bin/bash
# Throughput of every arm (DeepSpeed 1F1B, torch's five pipeline schedules, BLL) on llama-25m,
# S = 2, M = 4, kernel-docs (bpe:4096 shards). The flags: recipes/bench/throughput-arms-l25.yaml.
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --config recipes/bench/throughput-arms-l25.yaml "$@"
