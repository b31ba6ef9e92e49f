#!/bin/bash
# Throughput of BLL's cheap readout on llama-25m, S = 2, 16 sequences per step as M = 1 or 4
# micro-batches.
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --model models/llama-25m.json \
  --deepspeed_config ds_configs/llama-25m.json --data tokens:runs/kernel-docs-bpe4096 \
  --stages 2 --steps 12 --micro_batches 1,4 --sequences_per_step 16 --warmup_steps 4 --final_eval_batches 4 \
  --arms bll:dgl-context:dim=64:neg=2048 --repeats 1 --master_port 29816 --out results/throughput-cheap-readout-l25
