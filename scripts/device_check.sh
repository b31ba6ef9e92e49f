#!/bin/bash
# The device check: what one H200 can check of the GPU path (a pipeline of several NCCL
# ranks cannot share one GPU). Run it where the `device` tool lends a machine:
#     bash scripts/device_check.sh            # writes $OUT (default /tmp/device-check)
# It trains the 8-stage emulator on CUDA (both methods), a world-of-one launched run (with two
# GPUs also a launched bf16 block-local 2-stage run and its emulation, to compare), then
# evaluates (bf16 and fp32), exports and generates on the GPU, and prints every figure; about 5
# minutes on an H200, most of it the venv's first import and the tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device-check}"; mkdir -p "$OUT"
PY="${PY:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
COMMON="--model models/llama-25m.json --deepspeed_config ds_configs/llama-25m.json --tokenizer bpe:4096
        --seq_len 256 --steps 60 --log_interval 10 --eval_interval 0 --final_eval_batches 20 --save_interval 0
        --cache_dir $OUT/cache --no-progress"
for method in bll bp; do
  $PY scripts/pretrain.py $COMMON --emulate --stages 8 --method $method --out "$OUT/emulated-$method" \
      > "$OUT/emulated-$method.log" 2>&1 || { tail -30 "$OUT/emulated-$method.log"; exit 1; }
done
$PY scripts/pretrain.py $COMMON --stages 1 --method bp --out "$OUT/world-of-one" > "$OUT/world-of-one.log" 2>&1 \
    || { tail -30 "$OUT/world-of-one.log"; exit 1; }
# Launched block-local bf16 (two ranks, one GPU each) against the emulator: needs two GPUs.
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  ${DEEPSPEED:-deepspeed} --num_gpus 2 scripts/pretrain.py $COMMON --stages 2 --method bll --out "$OUT/launched-bll-s2" \
      > "$OUT/launched-bll-s2.log" 2>&1 || { tail -30 "$OUT/launched-bll-s2.log"; exit 1; }
  $PY scripts/pretrain.py $COMMON --emulate --stages 2 --method bll --out "$OUT/emulated-bll-s2" \
      > "$OUT/emulated-bll-s2.log" 2>&1 || { tail -30 "$OUT/emulated-bll-s2.log"; exit 1; }
fi
for dtype in bf16 fp32; do
  $PY scripts/evaluate.py "$OUT/emulated-bll" --device cuda --dtype $dtype --batches 20 --json "$OUT/eval-$dtype.json" \
      > "$OUT/eval-$dtype.log" 2>&1 || { tail -30 "$OUT/eval-$dtype.log"; exit 1; }
done
$PY scripts/export.py "$OUT/emulated-bll" "$OUT/export" > "$OUT/export.log" 2>&1 || { tail -30 "$OUT/export.log"; exit 1; }
$PY scripts/generate.py "$OUT/export" --device cuda --prompt "def " --max_new_tokens 64 > "$OUT/generate.txt" 2>&1 \
    || { tail -30 "$OUT/generate.txt"; exit 1; }
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("emulated-bll", "emulated-bp", "world-of-one", "launched-bll-s2", "emulated-bll-s2"):
    if not (out / run / "summary.json").is_file():
        continue  # the 2-stage pair needs two GPUs
    s = json.loads((out / run / "summary.json").read_text())
    print(run, {k: s[k] for k in ("device", "bf16", "val_loss", "tokens_per_s", "step_s_median", "wall_s")},
          "peak_cuda_mb", [d.get("peak_cuda_mb") for d in s["stages_detail"]])
for dtype in ("bf16", "fp32"):
    e = json.loads((out / f"eval-{dtype}.json").read_text())
    print("evaluate", dtype, {k: e[k] for k in ("loss", "tokens", "tokens_per_s")})
print("generate:", (out / "generate.txt").read_text()[:300])
PY
