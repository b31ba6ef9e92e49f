#!/bin/bash
# nanoGPT's own train.py side by side with BLL (M = 1 x 12 sequences, its best shape)
# and DeepSpeed 1F1B (M = 4 x 3), the same 2000 steps of 12 x 64 tokens, evaluated as nanoGPT's
# recipe does (every 250 steps, 20 batches).
cd "$(dirname "$0")/../.."
.venv/bin/python -m bll_bench compare --model models/nanogpt-char.json \
  --deepspeed_config ds_configs/nanogpt-char.json --data ../shared/data/tinyshakespeare.txt --tokenizer char \
  --stages 2 --steps 2000 --micro_batches 1 --sequences_per_step 12 --warmup_steps 5 \
  --eval_interval 250 --eval_batches 20 --final_eval_batches 20 \
  --arms bll,nanogpt --baseline nanogpt --nanogpt_dir ${NANOGPT_DIR:-../nanoGPT} \
  --repeats ${REPEATS:-2} --master_port 29820 --out results/nanogpt-side-by-side
