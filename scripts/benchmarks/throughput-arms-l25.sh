#!/bin/bash
# Throughput of every arm (DeepSpeed 1F1B, torch's five pipeline schedules, BLL) on llama-25m,
# S = 2, M = 4, kernel-docs (bpe:4096 shards).
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --model models/llama-25m.json \
  --deepspeed_config ds_configs/llama-25m.json --data tokens:runs/kernel-docs-bpe4096 \
  --stages 2 --steps 12 --micro_batches 4 --warmup_steps 4 --final_eval_batches 4 \
  --arms bp,bll,peer:1f1b,peer:interleaved-1f1b,peer:interleaved-zb,peer:zbv,peer:dualpipev \
  --repeats 1 --master_port 29815 --out results/throughput-arms-l25
