"""One config object per run: `RunConfig`, with documented defaults, filled from the command line.

Everything about *how DeepSpeed trains* (batch sizes, optimizer, scheduler, precision, ZeRO,
clipping) lives in the DeepSpeed JSON given with --deepspeed_config, unchanged from what a
DeepSpeed user writes. Everything about *what* is trained (model, data, tokenizer, method,
stages, steps, output) lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from bll_ds.bll.variants import VARIANTS as BLL_VARIANTS

METHODS = ("bp", "bll")
ON_NONFINITE = ("stop", "skip")


def _doc(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class RunConfig:
    model: str = _doc("Model spec: a Hugging Face config.json of the gpt2 or llama family (models/*.json).")
    deepspeed_config: str = _doc("DeepSpeed JSON config (ds_configs/*.json).")
    out: str = _doc("Run directory: checkpoints, tokenizer, metrics.jsonl, summary.json, tb/.")
    method: str = _doc("'bll' = block-local learning (each stage trains on its own local loss); "
                       "'bp' = DeepSpeed's own pipeline backprop (1F1B), the baseline.", default="bll")
    stages: int = _doc("Pipeline stages S. The launch needs N = S x data-parallel replicas ranks.", default=2)
    data: str | None = _doc("Text/jsonl/parquet file, folder, glob, or HF dataset name[:config]. "
                            "Default: the Python standard library sources of this interpreter.", default=None)
    tokenizer: str = _doc("'char', 'bpe:N', 'unigram:N' (trained on the training split, saved in the run "
                          "dir) or a path to a sentencepiece .model file.", default="bpe:4096")
    steps: int | None = _doc("Optimizer steps. Default: the scheduler's total_num_steps in the DeepSpeed "
                             "config, else 1000. It also sets the scheduler's total_num_steps.", default=None)
    bll_variant: str = _doc("Local loss of --method bll (docs/METHOD.md): prototype (feedback network's "
                            "target prototypes, default), gaussian, bernoulli (per-token agreement with a "
                            "collapse guard), dgl (free local head), drtp (fixed random feedback).",
                            default="prototype")
    bll_steps_per_call: int = _doc("Optimizer steps per engine call in --method bll. The pipe fills and drains "
                                   "once per call, not once per step; 1 = drain after every step.", default=32)
    bll_readout_max_logits_mb: float = _doc("The local readout (prototype, dgl, drtp) runs in sequence slices "
                                            "whose fp32 logits stay under this many MiB, so a large vocabulary "
                                            "does not add a [tokens, V] stash per stage (0 = one slice).",
                                            default=16.0)
    bll_guard_weight: float = _doc("Weight of the collapse guard of the gaussian/bernoulli variants.", default=1.0)
    bll_learn_variance: bool = _doc("gaussian variant: learn the message variances.", default=False)
    seq_len: int | None = _doc("Tokens per training sequence. Default: the model's context length.", default=None)
    seed: int = _doc("Seed for weights and data order.", default=1234)
    log_interval: int = _doc("Steps between metrics.jsonl / TensorBoard lines.", default=10)
    eval_interval: int = _doc("Steps between held-out evaluations (0 = only at the end).", default=250)
    eval_batches: int = _doc("Micro-batches per data-parallel replica in a periodic evaluation.", default=20)
    final_eval_batches: int = _doc("Micro-batches per replica in the final evaluation "
                                   "(0 = the whole held-out split).", default=0)
    save_interval: int = _doc("Steps between checkpoints (0 = only at the end).", default=500)
    keep_checkpoints: int = _doc("Complete checkpoints kept on disk (older ones are deleted).", default=2)
    exit_interval: int = _doc("Save a checkpoint and exit cleanly once the step count is a multiple of this "
                              "(0 = never): run long jobs in slices under a scheduler's time limit.", default=0)
    on_nonfinite: str = _doc("A step whose loss or gradients are NaN/inf is never applied. 'stop': the run "
                             "stops, naming the step, the stage and the last good checkpoint. 'skip': the "
                             "update is dropped and training goes on (the learning-rate schedule advances); "
                             "block-local stages decide alone, backprop stages together.", default="stop")
    max_consecutive_skips: int = _doc("With --on_nonfinite skip: a stage that skips more steps than this in a "
                                      "row has diverged, and the run stops.", default=10)
    resume: bool = _doc("Continue the run in --out from its latest complete checkpoint.", default=False)
    cache_dir: str = _doc("Cache of tokenized corpora (flat token memmaps).",
                          default=str(Path.home() / ".cache" / "bll_ds"))
    tokenize_workers: int = _doc("Processes for datasets.map tokenization.", default=2)
    throughput_warmup_steps: int = _doc("Steps excluded from the tokens/s median.", default=5)
    trace_steps: int = _doc("The last N warm-up steps are traced: every pipeline instruction timed into "
                            "timeline_stage{k}.json, and the saved-activation peak metered (0 = off).", default=3)
    measure_matmul_peak: bool = _doc("Measure the device's fp32/bf16 matrix-product peak after training, for "
                                     "model FLOP utilisation in summary.json (about 2 s: before and after training, the best kept).", default=True)
    progress: bool = _doc("Show a tqdm progress bar on rank 0.", default=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Pretrain a causal LM on a DeepSpeed pipeline. Launch with: "
                    "deepspeed --num_gpus N scripts/pretrain.py --model ... --deepspeed_config ... --out DIR")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name
        required = f.default is dataclasses.MISSING
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
        parser.add_argument(flag, type=kind, required=required,
                            default=None if required else f.default, help=f.metadata["help"],
                            choices={"method": METHODS, "bll_variant": BLL_VARIANTS,
                                     "on_nonfinite": ON_NONFINITE}.get(f.name))
        if "_" in f.name:  # accept --seq-len as well as --seq_len
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                                help=argparse.SUPPRESS)
    # Added by the deepspeed launcher; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    args = vars(build_parser().parse_args(argv))
    return RunConfig(**{f.name: args[f.name] for f in dataclasses.fields(RunConfig)})
