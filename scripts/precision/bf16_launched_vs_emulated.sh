#!/bin/bash
# bf16 through the launcher against the emulator, on the character model the precision fault was
# reported on: models/nanogpt-char.json, Tiny Shakespeare, the default variant, 200 steps, with
# bf16 forced on (and off, for the fp32 row). On CPUs without native bf16 the products are
# computed in software: the same roundings, about 5 minutes a run on 2 cores.
# Resumable: a run whose summary.json exists is skipped. Results: results/bf16-nanogpt-char/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/bf16-nanogpt-char
mkdir -p "$OUT"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
for precision in bf16 fp32; do
  python3 - "$precision" "$OUT/ds-$precision.json" <<'PY'
import json, sys
config = json.load(open("ds_configs/nanogpt-char.json"))
config["bf16"] = {"enabled": sys.argv[1] == "bf16"}
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
done
COMMON="--model models/nanogpt-char.json --data ../shared/data/tinyshakespeare.txt --tokenizer char
  --steps 200 --log_interval 10 --eval_interval 0 --no-progress --save_interval 100"
run() {  # name stages method precision driver
  local dir="$OUT/$1"
  [ -f "$dir/summary.json" ] && { echo "skip $1"; return; }
  rm -rf "$dir"
  local args="$COMMON --stages $2 --method $3 --deepspeed_config $OUT/ds-$4.json --out $dir"
  if [ "$5" = emulated ]; then
    .venv/bin/python scripts/pretrain.py --emulate $args > "$dir.log" 2>&1
  else
    .venv/bin/deepspeed --num_gpus "$2" --master_port 29851 scripts/pretrain.py $args > "$dir.log" 2>&1
  fi
  echo "done $1: $(grep -o '"val_loss": [0-9.]*' "$dir/summary.json")"
}
run bll-s2-launched-bf16 2 bll bf16 launched
run bll-s2-emulated-bf16 2 bll bf16 emulated
run bll-s2-launched-fp32 2 bll fp32 launched
run bp-s2-launched-bf16 2 bp bf16 launched
run bp-s2-emulated-bf16 2 bp bf16 emulated
run bll-s4-launched-bf16 4 bll bf16 launched
run bll-s4-emulated-bf16 4 bll bf16 emulated
