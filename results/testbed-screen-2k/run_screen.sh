#!/bin/bash
# The far-context screen (docs/results/quality.md): the S = 8 testbed at a quarter of the budget
# (2000 steps), the default's computation at H = 128 (critic-context) against the same with
# reconstruction offsets 1, 2, 4, 8 (far_context.py, registered through --custom_import), and
# against other label shares of the critic's target.
# Run from the repository root; each run resumes from its checkpoint where one was stopped.
export BLL_DS_THREADS=1 OMP_NUM_THREADS=1
common="--emulate --model models/nanogpt-char-d8.json --deepspeed_config ds_configs/nanogpt-char-d8-fp32.json --tokenizer char --steps 2000 --eval_interval 100 --eval_batches 20 --final_eval_batches 200 --save_interval 800 --log_interval 10 --seed 1234 --no-progress --method bll --stages 8 --seq_len 64 --data ../shared/data/kernel-docs.jsonl --resume auto"
for v in critic-farctx critic-context; do
  python scripts/pretrain.py --custom_import results/testbed-screen-2k/far_context.py $common \
      --bll_variant $v --out results/testbed-screen-2k/bll-$v-S8
done
# the critic's label share a (critic_label_weight.py): 0, 0.9 and 1 against critic-context's 0.5
# above, and dgl-context (free heads) at the same budget
for v in critic-context-a0 dgl-context critic-context-a09 critic-context-a1; do
  python scripts/pretrain.py --custom_import results/testbed-screen-2k/critic_label_weight.py $common \
      --bll_variant $v --out results/testbed-screen-2k/bll-$v-S8
done
# beside critic-context:labels=0.9 (the default's computation at H = 128; its a = 0.9 run above):
# a learned low-rank surrogate of the next block in the readout (next_block_surrogate.py), and a
# head for the token after next (future_token.py). The copy read at 1 position in 8
# (next_layer_subset.py) ran at the full budget instead, through the sweep with
# `-- --custom_import results/testbed-screen-2k/next_layer_subset.py` (docs/results/quality.md).
python scripts/pretrain.py --custom_import results/testbed-screen-2k/next_block_surrogate.py $common \
    --bll_variant critic-context-sur16:labels=0.9 --out results/testbed-screen-2k/bll-critic-context-sur16-labels0.9-S8
python scripts/pretrain.py --custom_import results/testbed-screen-2k/future_token.py $common \
    --bll_variant critic-future:labels=0.9 --out results/testbed-screen-2k/bll-critic-future-labels0.9-S8
# the received critic plus a free correction that stage k trains (critic_delta.py), a = 0.5
python scripts/pretrain.py --custom_import results/testbed-screen-2k/critic_delta.py $common \
    --bll_variant critic-context-delta --out results/testbed-screen-2k/bll-critic-context-delta-S8
# the received critic extrapolated over its two-step lag (critic_extrapolated.py), a = 0.9
python scripts/pretrain.py --custom_import results/testbed-screen-2k/critic_extrapolated.py $common \
    --bll_variant critic-context-extrap:labels=0.9 --out results/testbed-screen-2k/bll-critic-context-extrap-labels0.9-S8
# their second seeds (seed 2 instead of 1234 in $common, -seed2 after the run name)
python scripts/pretrain.py --custom_import results/testbed-screen-2k/critic_extrapolated.py ${common/--seed 1234/--seed 2} \
    --bll_variant critic-context-extrap:labels=0.9 --out results/testbed-screen-2k/bll-critic-context-extrap-labels0.9-S8-seed2
python scripts/pretrain.py ${common/--seed 1234/--seed 2} \
    --bll_variant critic-context:labels=0.9 --out results/testbed-screen-2k/bll-critic-context-labels0.9-S8-seed2
# the extrapolation's lam, now the option extrap= (2 spans the lag; 1 half of it; 4 twice),
# on one machine (2 and 4 side by side, then 1)
for lam in 2 4 1; do
  python scripts/pretrain.py $common --bll_variant critic-context:labels=0.9:extrap=$lam \
      --out results/testbed-screen-2k/bll-critic-context-labels0.9-extrap$lam-S8
done
# the default's pieces: its context heads (critic without them) and, for ranking, both at seed 2
python scripts/pretrain.py $common --bll_variant critic:labels=0.9:extrap=2 \
    --out results/testbed-screen-2k/bll-critic-labels0.9-extrap2-S8
for v in critic critic-context; do
  python scripts/pretrain.py ${common/--seed 1234/--seed 2} --bll_variant $v:labels=0.9:extrap=2 \
      --out results/testbed-screen-2k/bll-$v-labels0.9-extrap2-S8-seed2
done
