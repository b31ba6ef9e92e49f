#!/bin/bash
# Same short runs on the previous commit (/tmp/old) and on this one: per-step losses must match bit for bit.
set -e
REPO="$(cd "$(dirname "$0")/.." && pwd)"; OLD="${1:?usage: $0 OLD_COMMIT}"
rm -rf /tmp/equiv /tmp/old; mkdir -p /tmp/equiv; git -C "$REPO" worktree add -f /tmp/old "$OLD" >/dev/null
cd "$REPO"
D="$REPO/.venv/bin/deepspeed"
DATA="$(cd "$REPO/.." && pwd)/shared/data/tinyshakespeare.txt"
COMMON="--model models/test-1m.json --deepspeed_config ds_configs/test-1m.json --tokenizer char --seq_len 64 --log_interval 1 --eval_interval 6 --eval_batches 4 --final_eval_batches 8 --seed 7 --data $DATA --stages 2 --steps 12 --cache_dir /tmp/equiv-cache --no-progress"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
port=29700
for tree in old new; do
  root="$REPO"; [ $tree = old ] && root=/tmp/old
  for arm in "bp" "bll --bll_variant prototype --bll_steps_per_call 4" "bll --bll_variant gaussian --bll_steps_per_call 4"; do
    name=$(echo $arm | tr ' ' '_' | tr -d '-')
    port=$((port+1))
    (cd $root && $D --num_gpus 2 --master_port $port scripts/pretrain.py $COMMON --method $arm --out /tmp/equiv/$tree/$name > /tmp/equiv/$tree-$name.log 2>&1) || { echo "FAILED $tree $name"; tail -5 /tmp/equiv/$tree-$name.log; }
  done
done
python3 - <<'PY'
import json, pathlib
root = pathlib.Path("/tmp/equiv")
for run in sorted(p.name for p in (root / "new").iterdir()):
    for f in ("metrics.jsonl", "metrics_stage0.jsonl"):
        def rows(t):
            return [{k: v for k, v in json.loads(l).items() if k in ("step", "train/loss", "val/loss", "stage/loss", "stage/grad_norm")}
                    for l in (root / t / run / f).read_text().splitlines()]
        a, b = rows("old"), rows("new")
        print(run, f, "identical" if a == b else "DIFFERENT", len(a))
    sa = json.loads((root / "old" / run / "summary.json").read_text()); sb = json.loads((root / "new" / run / "summary.json").read_text())
    print("  val_loss", sa["val_loss"], sb["val_loss"], "params_sha256 equal:",
          [x["params_sha256"] for x in sa["stages_detail"]] == [x["params_sha256"] for x in sb["stages_detail"]])
PY
