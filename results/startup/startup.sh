#!/bin/bash
# Start-up, old (b86022f, in a worktree at /tmp/wt-old) against new (this checkout), deepspeed launcher,
# 2 CPU ranks, nanogpt-char. Run from the checkout's root with the background runs paused:
#   git worktree add /tmp/wt-old b86022f && bash results/startup/startup.sh
export DS_ACCELERATOR=cpu
NEW=$(pwd)
run() {  # label, repo, launcher...
  local label=$1 repo=$2; shift 2
  rm -rf /tmp/su-$label
  local t0=$(date +%s.%N)
  (cd $repo && "$@" scripts/pretrain.py --model models/nanogpt-char.json --deepspeed_config ds_configs/nanogpt-char.json \
      --stages 2 --data "$NEW/../shared/data/tinyshakespeare.txt" --tokenizer char --steps 20 --final_eval_batches 2 \
      --eval_interval 0 --out /tmp/su-$label --no-progress > /tmp/su-$label.log 2>&1)
  local t1=$(date +%s.%N)
  python3 - "$label" "$t0" "$t1" <<'PY'
import json, sys
label, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = json.load(open(f"/tmp/su-{label}/summary.json"))
print(f"{label}: whole {t1-t0:.1f}s | in-process start-up {s['startup_s']:.2f}s | process wall {s['wall_s']:.1f}s | launcher and exit {t1-t0-s['wall_s']:.1f}s")
PY
}
for i in 1 2 3; do
  run old$i /tmp/wt-old $NEW/.venv/bin/deepspeed --num_gpus 2 --master_port 29956
  run new$i $NEW $NEW/.venv/bin/deepspeed --num_gpus 2 --master_port 29957
done
for i in 1 2 3; do run torchrun$i $NEW $NEW/.venv/bin/torchrun --nproc_per_node 2 --master_port 29958; done
