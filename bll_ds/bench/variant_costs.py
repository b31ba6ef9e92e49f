"""What each registered BLL variant declares it costs, for one model spec.

    python -m bll_ds.bench variants --model models/llama-d16.json [--seq_len T] [--micro_batch_tokens N]
        [--micro_batches M] [--json FILE]

One row per variant in the registry (bll_ds/bll/variants.py), from the class's own declarations,
the same numbers the FLOPs model, the simulator and the memory planner use:

    readout MFLOP/token   the local loss's forward + backward per token (incl. per-micro-batch
                          costs spread over N tokens, and the per-step feedback update over M*N)
    x layer               that, over one decoder layer's training FLOPs per token at context T
    table bytes/step      what the stage sends upstream per optimizer step, fp32 and bf16
    sliced                whether the readout may run in sequence slices (per_token_readout)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bll_ds.bll import variants
from bll_ds.measure.flops import (TRAIN_OVER_FORWARD, feedback_step_flops, layer_forward_flops,
                                  readout_flops_per_micro_batch_token)
from bll_ds.modeling import load_model_spec

FP32, BF16 = 4, 2


def variant_costs(config, seq_len: int, micro_batch_tokens: int, micro_batches: int) -> list[dict]:
    layer = TRAIN_OVER_FORWARD * layer_forward_flops(config, seq_len)
    rows = []
    for name in variants.names():
        cls = variants.get(name)
        per_token = (readout_flops_per_micro_batch_token(config, name, micro_batch_tokens)
                     + feedback_step_flops(config, name) / (micro_batch_tokens * micro_batches))
        rows.append({"variant": name, "readout_flops_per_token": per_token,
                     "over_one_layer": per_token / layer,
                     "table_bytes_per_step_fp32": cls.table_bytes_per_step(config, FP32),
                     "table_bytes_per_step_bf16": cls.table_bytes_per_step(config, BF16),
                     "feedback_matrix_parameters": cls.trainable_matrix_parameters(config),
                     "sliced": bool(cls.per_token_readout)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | readout MFLOP/token | x one layer | message upstream MiB/step fp32 | bf16 | feedback params | sliced |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['readout_flops_per_token'] / 1e6:.2f} | {r['over_one_layer']:.2f} | "
                     f"{r['table_bytes_per_step_fp32'] / 2**20:.2f} | {r['table_bytes_per_step_bf16'] / 2**20:.2f} | "
                     f"{r['feedback_matrix_parameters']:,} | {'yes' if r['sliced'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bll_ds.bench variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model spec, e.g. models/llama-d16.json")
    p.add_argument("--vocab_size", type=int, default=None, help="override the spec's vocabulary (e.g. 32768)")
    p.add_argument("--seq_len", type=int, default=None, help="context T (default: the spec's)")
    p.add_argument("--micro_batch_tokens", type=int, default=None, help="tokens per micro-batch (default T)")
    p.add_argument("--micro_batches", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    config = load_model_spec(args.model, vocab_size=args.vocab_size)
    seq_len = args.seq_len or config.max_position_embeddings
    rows = variant_costs(config, seq_len, args.micro_batch_tokens or seq_len, args.micro_batches)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0
