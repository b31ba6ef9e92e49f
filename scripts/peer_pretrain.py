#!/usr/bin/env python
"""Train a peer arm: one of torch.distributed.pipelining's schedules on the model, data,
micro-batches and optimizer that `scripts/pretrain.py --method bp` trains (bll_bench/peer_pipeline.py).

    torchrun --nproc_per_node 2 --master_port 29500 scripts/peer_pretrain.py --schedule zbv \
        --model models/test-1m.json --deepspeed_config ds_configs/test-1m.json \
        --data ../shared/data/tinyshakespeare.txt --tokenizer char --steps 20 --out runs/peer-zbv

Takes pretrain.py's flags plus --schedule {1f1b, interleaved-1f1b, interleaved-zb, zbv,
dualpipev}. Used: the model, data, tokenizer, DeepSpeed config (optimizer, schedule, batch,
clipping), steps, seed, seq_len, the eval flags, --log_interval, --throughput_warmup_steps and
--link_delay_ms. Not used: --method and --stages (the pipeline has N x stages-per-rank stages on
the N launched ranks), the BLL flags, checkpoints (a peer run cannot resume), bf16 (fp32 only).

Writes what `pretrain.py` writes for the benchmark harness to read (bll_bench/compare.py):
metrics.jsonl (train/loss, train/lr, train/grad_norm every --log_interval steps; val/loss at
every --eval_interval and at the end), metrics_stage{r}.jsonl per rank (stage/step_s), and
summary.json (method "bp", pipeline_schedule, tokens/s median after the warm-up, val_loss,
wall_s, started_at, per-rank peak RSS).
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

from bll_bench.peer_pipeline import PEER_SCHEDULES, PeerArm  # noqa: E402
from bll_ds.data import EvalBatches, MicroBatchSampler  # noqa: E402
from bll_ds.data.prepare import prepare_run_data  # noqa: E402
from bll_ds.infra import distributed  # noqa: E402
from bll_ds.infra.atomic import atomic_write_text  # noqa: E402
from bll_ds.infra.errors import UserError  # noqa: E402
from bll_ds.measure.rss import peak_rss_mb  # noqa: E402
from bll_ds.metrics.log import MetricsLog  # noqa: E402
from bll_ds.modeling import count_parameters, load_model_spec  # noqa: E402
from bll_ds.pipeline.step_record import StepRecord  # noqa: E402
from bll_ds.pipeline.launched import link_delay  # noqa: E402
from bll_ds.run import run_dir as names  # noqa: E402
from bll_ds.run.config import build_parser, parse_run_config, resolve_seq_len  # noqa: E402
from bll_ds.run.ds_config import load_ds_config  # noqa: E402


def train(schedule: str, argv: list[str]) -> None:
    cfg = parse_run_config(argv)
    rank, world = distributed.launch_env()
    spec = PEER_SCHEDULES[schedule]
    ds = load_ds_config(cfg.deepspeed_config, world, world, cfg.steps, defer_bf16_auto=True,
                        overrides=cfg.ds_set)
    if ds.config.get("bf16", {}).get("enabled", False) not in (False, None, "auto"):
        raise UserError(f"{cfg.deepspeed_config} enables bf16; the peer arms run fp32 only.",
                        'use a config with "bf16": {"enabled": false} (or "auto", read as fp32 here).')
    distributed.init()
    link_delay.install(cfg.link_delay_ms)
    run_dir = Path(cfg.out)
    data = prepare_run_data(cfg, run_dir)
    model_config = load_model_spec(cfg.model, vocab_size=data.tokenizer.vocab_size)
    seq_len = resolve_seq_len(cfg, model_config)
    arm = PeerArm(spec, model_config, ds.config, cfg.seed, ds.micro_batches)
    sampler = MicroBatchSampler(data.train_tokens, seq_len, ds.micro_batch_size, cfg.seed)
    eval_set = list(EvalBatches(data.val_tokens, seq_len, ds.micro_batch_size, cfg.eval.batches))
    final_eval_set = list(EvalBatches(data.val_tokens, seq_len, ds.micro_batch_size, cfg.eval.final_batches or 10**9))
    last_rank = arm.owner(arm.num_stages - 1)
    tokens_per_step = ds.micro_batches * ds.micro_batch_size * seq_len
    log = MetricsLog(run_dir / names.METRICS, run_dir / names.TENSORBOARD, rank == last_rank, 0,
                     ds.steps if cfg.metrics.progress else None, tokens_per_step=tokens_per_step)
    stage_log = MetricsLog(names.stage_metrics(run_dir, rank), names.stage_tensorboard(run_dir, rank), True, 0)
    log.print(f"bll-ds peer: {spec.class_name} | {arm.num_stages} stages on {world} ranks | "
              f"{count_parameters(model_config) / 1e6:.2f}M params | vocab {model_config.vocab_size} | "
              f"{ds.micro_batches} micro-batches x {ds.micro_batch_size} x {seq_len} tokens | "
              f"steps 0->{ds.steps} | {run_dir}")
    step_times = []
    train_started = time.time()
    for step in range(1, ds.steps + 1):
        batches = [sampler.get(step - 1, m, ds.micro_batches) for m in range(ds.micro_batches)]
        lr = arm.optimizer.param_groups[0]["lr"]
        begin = time.perf_counter()
        loss, norm = arm.train_step(batches)
        step_s = time.perf_counter() - begin  # each rank's own step; the harness reads the last rank's
        step_times.append(step_s)
        stage_log.log(step, {"stage/step_s": step_s, "stage/grad_norm": norm}, echo=False)
        log.advance(StepRecord(step=step, loss=loss, step_s=step_s, busy_s=step_s, idle_s=0.0, lr=lr))
        if step % cfg.metrics.log_interval == 0 or step == ds.steps:
            log.log(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                           "train/tokens_per_s": tokens_per_step / step_s,
                           "train/tokens_seen": step * tokens_per_step})
        if cfg.eval.interval and step % cfg.eval.interval == 0 and step < ds.steps:
            log.log(step, {"val/loss": arm.evaluate(eval_set)})
    train_wall_s = time.time() - train_started
    val_loss = arm.evaluate(final_eval_set)
    log.log(ds.steps, {"val/loss": val_loss})
    median_step_s = statistics.median(step_times[cfg.metrics.throughput_warmup_steps:] or step_times)
    mine = {"stage": rank, "pipeline_stages": arm.stage_ids, "peak_rss_mb": round(peak_rss_mb(), 1),
            "step_s_median": round(median_step_s, 5), "utilisation": None,
            "activation_peak_mb": None, "mfu": None, "model_gflops_per_s": None, "matmul_peak_gflops": None,
            "grads_sent": 0}
    gathered = [None] * world
    tdist.all_gather_object(gathered, mine)
    if rank == last_rank:
        summary = {"method": "bp", "pipeline_schedule": spec.name, "torch_class": spec.class_name,
                   "stages": world, "pipeline_stages": arm.num_stages, "dp": 1,
                   "params": count_parameters(model_config), "steps": ds.steps, "resumed_from_step": 0,
                   "tokens_seen": ds.steps * tokens_per_step, "tokens_per_step": tokens_per_step,
                   "started_at": round(STARTED, 3), "wall_s": round(time.time() - STARTED, 2),
                   "train_wall_s": round(train_wall_s, 2), "startup_s": round(train_started - STARTED, 2),
                   "tokens_per_s": round(tokens_per_step / median_step_s, 1),
                   "step_s_median": round(median_step_s, 5), "val_loss": round(val_loss, 5),
                   "seq_len": seq_len, "micro_batches": ds.micro_batches, "micro_batch_size": ds.micro_batch_size,
                   "bf16": False, "device": str(arm.device), "link_delay_ms": cfg.link_delay_ms,
                   "stages_detail": gathered}
        atomic_write_text(run_dir / names.SUMMARY, json.dumps(summary, indent=2) + "\n")
    log.print(f"done: val_loss={val_loss:.4f} | summary in {run_dir / names.SUMMARY}")
    log.close()
    stage_log.close()
    link_delay.uninstall()
    distributed.shutdown()


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(prog="peer_pretrain.py", add_help=False,
                                  description=__doc__.split("\n\n")[0].strip())
    pre.add_argument("--schedule", required=True, choices=sorted(PEER_SCHEDULES),
                     help="the torch.distributed.pipelining schedule to train with")
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):  # --schedule's help, then every flag it shares with pretrain.py
        pre.print_help()
        print("\nThe flags of pretrain.py, which it takes too:\n")
        build_parser().print_help()
        return 0
    known, rest = pre.parse_known_args(args)
    try:
        train(known.schedule, rest)
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
