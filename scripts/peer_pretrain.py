#!/usr/bin/env python
"""Train a peer arm: one of torch.distributed.pipelining's schedules on the model, data,
micro-batches and optimizer that `scripts/pretrain.py --method bp` trains (bll_ds/bench/peer_pipeline.py).

    torchrun --nproc_per_node 2 --master_port 29500 scripts/peer_pretrain.py --schedule zbv \
        --model models/test-1m.json --deepspeed_config ds_configs/test-1m.json \
        --data ../shared/data/tinyshakespeare.txt --tokenizer char --steps 20 --out runs/peer-zbv

Takes pretrain.py's flags (--method, --stages and the BLL/eval/checkpoint flags are ignored: the
pipeline has N x stages-per-rank stages on N ranks, no data parallelism, fp32, no checkpoints)
plus --schedule {1f1b, interleaved-1f1b, interleaved-zb, zbv, dualpipev}. Writes, on rank 0,
OUT/peer_metrics.jsonl (one line per step: loss, grad_norm before clipping, lr, step_s) and
OUT/peer_summary.json.
"""

import time

STARTED = time.time()

import _bootstrap  # noqa: E402,F401

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

from bll_ds import distributed  # noqa: E402
from bll_ds.bench.peer_pipeline import PEER_SCHEDULES, PeerArm, rank_stages  # noqa: E402
from bll_ds.config import parse_run_config  # noqa: E402
from bll_ds.data import MicroBatchSampler  # noqa: E402
from bll_ds.ds_config import load_ds_config  # noqa: E402
from bll_ds.errors import UserError  # noqa: E402
from bll_ds.modeling import load_model_spec  # noqa: E402
from bll_ds.prepare import prepare_run_data  # noqa: E402


def train(schedule: str, argv: list[str]) -> None:
    cfg = parse_run_config(argv)
    rank, world = distributed.launch_env()
    spec = PEER_SCHEDULES[schedule]
    ds = load_ds_config(cfg.deepspeed_config, world, world, cfg.steps, defer_bf16_auto=True)
    if ds.config.get("bf16", {}).get("enabled", False) not in (False, None):
        raise UserError(f"{cfg.deepspeed_config} enables bf16; the peer arms run fp32 only.",
                        'use a config with "bf16": {"enabled": false}.')
    distributed.init()
    run_dir = Path(cfg.out)
    data = prepare_run_data(cfg, run_dir)
    model_config = load_model_spec(cfg.model, vocab_size=data.tokenizer.vocab_size)
    seq_len = cfg.seq_len or model_config.max_position_embeddings
    arm = PeerArm(spec, model_config, ds.config, cfg.seed, ds.micro_batches)
    sampler = MicroBatchSampler(data.train_tokens, seq_len, ds.micro_batch_size, cfg.seed)
    last_rank = next(r for r in range(world) if arm.num_stages - 1 in rank_stages(spec, r, world))
    metrics = (run_dir / "peer_metrics.jsonl").open("w") if rank == 0 else None
    if rank == 0:
        print(f"bll-ds peer: {spec.class_name} | {arm.num_stages} stages on {world} ranks | "
              f"{ds.micro_batches} micro-batches x {ds.micro_batch_size} x {seq_len} tokens | "
              f"steps 0->{ds.steps} | {run_dir}", flush=True)
    step_times = []
    for step in range(ds.steps):
        batches = [sampler.get(step, m, ds.micro_batches) for m in range(ds.micro_batches)]
        lr = arm.optimizer.param_groups[0]["lr"]
        tdist.barrier()
        begin = time.perf_counter()
        loss, norm = arm.train_step(batches)
        step_s = time.perf_counter() - begin
        shared = torch.tensor([loss if loss is not None else 0.0])
        tdist.broadcast(shared, src=last_rank)
        step_times.append(step_s)
        if metrics is not None:
            metrics.write(json.dumps(dict(step=step + 1, loss=float(shared), grad_norm=norm, lr=lr,
                                          step_s=step_s)) + "\n")
            metrics.flush()
    if rank == 0:
        metrics.close()
        tokens = ds.micro_batches * ds.micro_batch_size * seq_len
        summary = dict(schedule=spec.name, torch_class=spec.class_name, ranks=world, stages=arm.num_stages,
                       steps=ds.steps, final_loss=float(shared), median_step_s=statistics.median(step_times),
                       median_tokens_per_s=tokens / statistics.median(step_times),
                       wall_s=time.time() - STARTED)
        (run_dir / "peer_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"bll-ds peer: done, final loss {float(shared):.4f}", flush=True)
    distributed.shutdown()


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--schedule", required=True, choices=sorted(PEER_SCHEDULES))
    known, rest = pre.parse_known_args(argv)
    try:
        train(known.schedule, rest)
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
