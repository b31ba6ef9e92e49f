#!/bin/bash
# Behaviour unchanged by a refactor: the same short runs on an older commit and on this checkout;
# per-step losses, gradient norms, held-out losses and final weights (params_sha256) must match
# bit for bit. Launched S = 2 (the deepspeed runner, 2 CPU ranks) and emulated S = 4 (--emulate),
# for backprop and block-local variants.
#
#   scripts/check_refactor_equivalence.sh OLD_COMMIT        (about 10 minutes on 2 cores)
set -e
REPO="$(cd "$(dirname "$0")/.." && pwd)"; OLD="${1:?usage: $0 OLD_COMMIT}"
WORK="${EQUIV_DIR:-/tmp/equiv}"; OLD_TREE="$WORK-old-tree"
rm -rf "$WORK" "$OLD_TREE"; mkdir -p "$WORK"
git -C "$REPO" worktree add -f "$OLD_TREE" "$OLD" >/dev/null
cd "$REPO"
PY="$REPO/.venv/bin/python"; D="$REPO/.venv/bin/deepspeed"
DATA="$(cd "$REPO/.." && pwd)/shared/data/tinyshakespeare.txt"
[ -f "$DATA" ] || DATA="$(ls "$PY" >/dev/null && "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/argparse.py"
COMMON="--model models/test-1m.json --deepspeed_config ds_configs/test-1m.json --tokenizer char --seq_len 64 --log_interval 1 --eval_interval 6 --eval_batches 4 --final_eval_batches 8 --seed 7 --data $DATA --steps 12 --cache_dir $WORK/cache --no-progress"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
port=${EQUIV_PORT:-29790}
for tree in old new; do
  root="$REPO"; [ $tree = old ] && root="$OLD_TREE"
  for arm in "bp" "bll --bll_variant prototype --bll_steps_per_call 4" "bll --bll_variant gaussian --bll_steps_per_call 4" \
             "bll --bll_variant dgl-context --bll_steps_per_call 4"; do
    name=launched-S2-$(echo $arm | cut -d' ' -f1,3 | tr ' ' '_' | tr -d '-')
    port=$((port+1))
    (cd "$root" && $D --num_gpus 2 --master_port $port scripts/pretrain.py $COMMON --stages 2 --method $arm --out $WORK/$tree/$name > $WORK/$tree-$name.log 2>&1) || { echo "FAILED $tree $name"; tail -5 $WORK/$tree-$name.log; }
  done
  for arm in "bp" "bll --bll_variant prototype" "bll --bll_variant gaussian" "bll --bll_variant dgl-context" "bll --bll_variant dgl:neg=16" \
             "bll --bll_variant prototype-overlap" "bll --bll_variant dgl-aux"; do
    name=emulated-S4-$(echo $arm | cut -d' ' -f1,3 | tr ' :=' '___' | tr -d '-')
    (cd "$root" && $PY scripts/pretrain.py $COMMON --emulate --stages 4 --method $arm --out $WORK/$tree/$name > $WORK/$tree-$name.log 2>&1) || { echo "FAILED $tree $name"; tail -5 $WORK/$tree-$name.log; }
  done
done
git -C "$REPO" worktree remove --force "$OLD_TREE"
"$PY" - "$WORK" <<'PY'
import json, pathlib, sys
root, bad = pathlib.Path(sys.argv[1]), 0
keys = ("step", "train/loss", "val/loss", "stage/loss", "stage/grad_norm")
for run in sorted(p.name for p in (root / "new").iterdir()):
    for f in sorted(p.name for p in (root / "new" / run).glob("metrics*.jsonl")):
        rows = {t: [{k: v for k, v in json.loads(l).items() if k in keys}
                    for l in (root / t / run / f).read_text().splitlines()] for t in ("old", "new")}
        same = rows["old"] == rows["new"]
        bad += not same
        print(f"{run:40s} {f:22s} {'identical' if same else 'DIFFERENT'} ({len(rows['new'])} rows)")
    old, new = (json.loads((root / t / run / "summary.json").read_text()) for t in ("old", "new"))
    weights = [s["params_sha256"] for s in old["stages_detail"]] == [s["params_sha256"] for s in new["stages_detail"]]
    bad += not weights or old["val_loss"] != new["val_loss"]
    print(f"{run:40s} val_loss {old['val_loss']} {new['val_loss']}, final weights {'identical' if weights else 'DIFFERENT'}")
print("EQUIVALENT" if bad == 0 else f"NOT EQUIVALENT: {bad} differences")
sys.exit(1 if bad else 0)
PY
