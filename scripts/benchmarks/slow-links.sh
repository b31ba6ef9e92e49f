#!/bin/bash
# Slow links: one-way delays between the two stages (--link_delay_ms in every run).
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
# nanogpt-char, S = 2, 4 micro-batches of 3 x 64 tokens: one micro-batch's compute is comparable to the delay.
.venv/bin/python -m bll_bench compare --model models/nanogpt-char.json \
  --deepspeed_config ds_configs/nanogpt-char.json --data ../shared/data/tinyshakespeare.txt --tokenizer char \
  --stages 2 --steps 60 --micro_batches 4 --warmup_steps 10 --final_eval_batches 2 \
  --arms bll,bp,peer:1f1b,peer:zbv,peer:dualpipev --link_delays_ms 0,1,5,20 --baseline peer:zbv \
  --repeats 1 --master_port 29818 --out results/slow-links-nanogpt
.venv/bin/python -m bll_bench.calibrate results/slow-links-nanogpt
# llama-25m, the compute-heavy contrast (a micro-batch takes about 0.4 s per stage).
.venv/bin/python -m bll_bench compare --model models/llama-25m.json \
  --deepspeed_config ds_configs/llama-25m.json --data tokens:runs/kernel-docs-bpe4096 \
  --stages 2 --steps 12 --micro_batches 4 --warmup_steps 4 --final_eval_batches 2 \
  --arms bll:dgl-context:dim=64:neg=2048,peer:zbv --link_delays_ms 0,20 --baseline peer:zbv \
  --repeats 1 --master_port 29819 --out results/slow-links-l25
