#!/usr/bin/env python
"""Held-out loss, perplexity and tokens/s of a run's full forward network.

    python scripts/evaluate.py runs/pretrain                       # the run's own held-out split
    python scripts/evaluate.py runs/pretrain --data other.txt      # any corpus, the run's tokenizer
    python scripts/evaluate.py runs/pretrain --residual_norms      # how much each layer adds to the stream
    python scripts/evaluate.py runs/pretrain --device cuda:1 --dtype fp32
    deepspeed --num_gpus 2 scripts/evaluate.py runs/pretrain       # ranks split the batches

The held-out split of --data is taken as training takes it (docs/GUIDE.md: "Held-out data"), in windows
of the run's sequence length; --batches 0 (default) evaluates the whole split, which on the run's
own data reproduces summary.json's val_loss.

--device defaults to CUDA where there is one (under the launcher, each rank its LOCAL_RANK GPU,
with NCCL; gloo on CPUs) and --dtype to bf16 there (fp32 on CPUs). The loss is taken in fp32
either way; bf16 weights move it by rounding only (tests/test_use_model.py).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (the checkout on sys.path; CPU accelerator without CUDA)
import torch  # noqa: E402

from bll_ds.data import (EvalBatches, is_token_dir_spec, load_corpus, load_run_tokenizer, open_stream,  # noqa: E402
                         open_token_dir, prepare_token_streams, token_dtype)
from bll_ds.infra.cli_types import DefaultsHelpFormatter, at_least  # noqa: E402
from bll_ds.infra.errors import UserError  # noqa: E402
from bll_ds.run.run_dir import TOKENIZER_MODEL  # noqa: E402
from bll_ds.use.devices import add_device_flags, dtype_name, resolve_device, resolve_dtype  # noqa: E402
from bll_ds.use.trained_run import evaluate as evaluate_batches  # noqa: E402
from bll_ds.use.trained_run import load_forward_network, residual_norms  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("run_dir", help="the run to evaluate: a pretrain.py --out folder")
    p.add_argument("--data", default=None,
                   help="corpus whose held-out split is evaluated (as pretrain.py --data); None = the run's own")
    p.add_argument("--step", type=at_least(0), default=None, help="checkpoint step to load; None = the latest complete one")
    p.add_argument("--batches", type=at_least(0, "0 = the whole held-out split"), default=0,
                   help="micro-batches to evaluate; 0 = the whole held-out split")
    p.add_argument("--batch_size", type=at_least(1), default=None,
                   help="sequences per batch; None = the run's micro_batch_size")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "bll_ds"),
                   help="folder of tokenized corpora, shared with pretrain.py --cache_dir")
    p.add_argument("--residual_norms", action="store_true",
                   help="also report, per decoder layer, the RMS of the residual stream it reads and of its update")
    p.add_argument("--json", default=None, help="file to also write the result JSON to; None = stdout only")
    add_device_flags(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(int(os.environ.get("BLL_DS_THREADS", 1 if world > 1 else torch.get_num_threads())))
    try:
        result = run(Path(args.run_dir), args, rank, world)
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def run(run_dir: Path, args, rank: int, world: int) -> dict:
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else None)
    dtype = resolve_dtype(args.dtype, device)
    config, layers, meta = load_forward_network(run_dir, args.step)
    layers.to(device=device, dtype=dtype)
    data = args.data if args.data is not None else meta.get("data")
    tokenizer = load_run_tokenizer(run_dir)  # sentencepiece or Hugging Face, as the run trained
    if world > 1:
        _init_process_group(device)
    if is_token_dir_spec(data):  # token shards written by prepare_tokens: memory-mapped, nothing to tokenize
        val = open_token_dir(data, verify=rank == 0).val
    else:
        # Rank 0 tokenizes into the shared cache first, so the others only read it.
        for turn in ((0, 1) if world > 1 else (rank,)):
            if turn == rank:
                corpus = load_corpus(data, text_field=meta.get("text_field") or "text")
                streams = prepare_token_streams(corpus, tokenizer, args.cache_dir)
            if world > 1:
                torch.distributed.barrier()
        val = open_stream(streams.val_path, token_dtype(tokenizer.vocab_size))
    batches = EvalBatches(val, meta["seq_len"], args.batch_size or meta["micro_batch_size"], args.batches or 10**9)
    result = evaluate_batches(layers, batches, rank, world, device)
    if args.residual_norms:
        result["residual_norms"] = residual_norms(layers, batches, device=device)
    if world > 1:
        torch.distributed.destroy_process_group()
    return {"run_dir": str(run_dir), "step": meta["step"], "data": data or "default corpus",
            "seq_len": meta["seq_len"], "ranks": world, "device": str(device), "dtype": dtype_name(dtype), **result}


def _init_process_group(device: torch.device) -> None:
    """NCCL between GPUs (each rank bound to its own first, so collectives use it), gloo on CPUs."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")


if __name__ == "__main__":
    sys.exit(main())
