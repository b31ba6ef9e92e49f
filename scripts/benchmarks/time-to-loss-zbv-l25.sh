#!/bin/bash
# Time to a target loss against torch's ZBV zero-bubble schedule: llama-25m, S = 2,
# M = 4 x 4 x 256 tokens, kernel-docs (bpe:4096 shards), 400 steps (1.64M tokens), held-out loss
# every 25 steps on the same 20 micro-batches. Arms: the fastest backprop arm of
# throughput-arms-l25.sh (torch's ZBV zero-bubble schedule) and BLL with its cheap readout.
# Re-running continues where it stopped (finished runs are kept); --repeats 2 adds the second,
# reversed-order repeat.
cd "$(dirname "$0")/../.."
[ -f runs/kernel-docs-bpe4096/tokens.json ] || .venv/bin/python -m bll_ds.data.prepare_tokens \
  --data ../shared/data/kernel-docs.jsonl --tokenizer bpe:4096 --out runs/kernel-docs-bpe4096 --tokenize_workers 2
.venv/bin/python -m bll_bench compare --model models/llama-25m.json \
  --deepspeed_config ds_configs/llama-25m.json --data tokens:runs/kernel-docs-bpe4096 \
  --stages 2 --steps 400 --micro_batches 4 --warmup_steps 5 \
  --eval_interval 25 --eval_batches 20 --final_eval_batches 20 --target_loss best-bp \
  --arms peer:zbv,bll:dgl-context:dim=64:neg=2048 --baseline peer:zbv --repeats ${REPEATS:-1} \
  --master_port 29817 --out results/time-to-loss-zbv-l25
