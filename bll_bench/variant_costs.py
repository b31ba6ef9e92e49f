"""What each registered BLL variant declares it costs, for one model spec.

    python -m bll_bench variants --model models/llama-d16.json [--seq_len T] [--micro_batch_tokens N]
        [--micro_batches M] [--layers_per_stage L] [--variants SPEC,...] [--json FILE]

One row per variant in the registry (bll_ds/method/variants.py) and one for the default with its
options (marked), or one per --variants spec with its options (bll_ds/method/variant_options.py,
e.g. dgl-context:dim=64:neg=2048), from the class's own declarations, the same numbers the FLOPs
model, the simulator and the memory planner use:

    readout MFLOP/token   the local loss's forward + backward per token (incl. per-micro-batch
                          costs spread over N tokens, and the per-step feedback update over M*N),
                          on a middle stage: with a critic variant, the critic of its input too
    x layer               that, over one decoder layer's training FLOPs per token at context T
    of a stage            that, over the forward + backward of a stage of L decoder layers
    message MiB/step      what the stage sends upstream per optimizer step, in fp32 and bf16
                          training (a table= option fixes its own dtype), averaged over refresh=k
    x fp32 table          that, over the full V x H fp32 table the plain table variants send
    sliced                whether the readout may run in sequence slices (per_token_readout)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bll_ds.method import variants
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.measure.flops import (TRAIN_OVER_FORWARD, NotModelled, feedback_step_flops, layer_forward_flops,
                                  readout_flops_per_micro_batch_token)
from bll_ds.modeling import load_model_spec

FP32, BF16 = 4, 2


def variant_costs(config, seq_len: int, micro_batch_tokens: int, micro_batches: int,
                  specs: list[str] | None = None, layers_per_stage: float = 1) -> list[dict]:
    layer = TRAIN_OVER_FORWARD * layer_forward_flops(config, seq_len)
    full_table = config.vocab_size * config.hidden_size * FP32
    rows = []
    for name in specs or [*variants.names(), DEFAULT_VARIANT]:
        variant = variants.get(name)
        try:
            per_token = (readout_flops_per_micro_batch_token(config, name, micro_batch_tokens)
                         + feedback_step_flops(config, name) / (micro_batch_tokens * micro_batches)
                         + variant.input_critic_flops_per_token(config))
        except NotModelled:
            per_token = None
        rows.append({"variant": name, "default": name == DEFAULT_VARIANT, "readout_flops_per_token": per_token,
                     "over_one_layer": None if per_token is None else per_token / layer,
                     "layers_per_stage": layers_per_stage,
                     "over_stage": None if per_token is None else per_token / (layers_per_stage * layer),
                     "table_over_fp32_full": variant.table_bytes_per_step(config, FP32) / full_table,
                     "table_bytes_per_step_fp32": variant.table_bytes_per_step(config, FP32),
                     "table_bytes_per_step_bf16": variant.table_bytes_per_step(config, BF16),
                     "feedback_matrix_parameters": (variant.trainable_matrix_parameters(config)
                                                    + variant.input_critic_parameters(config)),
                     "sliced": bool(variant.per_token_readout)})
    return rows


def markdown(rows: list[dict]) -> str:
    layers = rows[0]["layers_per_stage"] if rows else 1
    lines = [f"| variant | readout MFLOP/token | x one layer | x a {layers:g}-layer stage | message upstream "
             f"MiB/step fp32 | bf16 | x fp32 table | feedback params | sliced |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = ("not modelled | | " if r["readout_flops_per_token"] is None else
                 f"{r['readout_flops_per_token'] / 1e6:.2f} | {r['over_one_layer']:.4f} | {r['over_stage']:.4f}")
        lines.append(f"| {r['variant']}{' (default)' if r['default'] else ''} | {flops} | {r['table_bytes_per_step_fp32'] / 2**20:.2f} | "
                     f"{r['table_bytes_per_step_bf16'] / 2**20:.2f} | {r['table_over_fp32_full']:.4f} | "
                     f"{r['feedback_matrix_parameters']:,} | {'yes' if r['sliced'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bll_bench variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model spec, e.g. models/llama-d16.json")
    p.add_argument("--vocab_size", type=int, default=None, help="override the spec's vocabulary (e.g. 32768)")
    p.add_argument("--seq_len", type=int, default=None, help="context T (default: the spec's)")
    p.add_argument("--micro_batch_tokens", type=int, default=None, help="tokens per micro-batch (default T)")
    p.add_argument("--micro_batches", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--layers_per_stage", type=float, default=1, help="decoder layers per stage (the 'x a stage' column)")
    p.add_argument("--variants", default=None,
                   help="comma-separated variant specs with options (default: every registered variant)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    config = load_model_spec(args.model, vocab_size=args.vocab_size)
    seq_len = args.seq_len or config.max_position_embeddings
    specs = args.variants.split(",") if args.variants else None
    for spec in specs or ():
        variants.get(spec)  # an unknown name or option fails here with the registry's message
    rows = variant_costs(config, seq_len, args.micro_batch_tokens or seq_len, args.micro_batches, specs,
                         args.layers_per_stage)
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0
