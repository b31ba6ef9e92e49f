"""The training entry: compose config, data, model, engine, checkpoints and metrics.

Launch through scripts/pretrain.py with the deepspeed runner. The loop in `train()` is the whole
story of a step: fetch deterministic micro-batches, let the engine run its schedule, account
time, log, evaluate, checkpoint.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import sys
import time
from pathlib import Path

import deepspeed.comm as dist
import torch

from bll_ds import checkpoint, distributed
from bll_ds.config import RunConfig, parse_run_config
from bll_ds.data import EvalBatches, MicroBatchSampler, parse_tokenizer_spec
from bll_ds.ds_config import DsSettings, load_ds_config
from bll_ds.engine import build_engine
from bll_ds.errors import UserError
from bll_ds.metrics import MetricsLog, write_summary
from bll_ds.modeling import build_pipeline_module, check_stages, count_parameters, load_model_spec
from bll_ds.prepare import prepare_run_data


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """`started`: when the process began (scripts/pretrain.py passes it before its imports), so
    summary.json's wall_s covers start-up too."""
    started = started or time.time()
    cfg = parse_run_config(argv)
    rank, _ = distributed.launch_env()
    try:
        train(cfg, started)
    except UserError as err:
        if rank == 0:
            print(f"bll-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()
    return 0


def train(cfg: RunConfig, started: float) -> None:
    rank, world = distributed.launch_env()
    # Fail on bad input before any process group, file or thread exists.
    spec = load_model_spec(cfg.model)
    check_stages(spec, cfg.stages)
    _seq_len(cfg, spec)
    ds = load_ds_config(cfg.deepspeed_config, world, cfg.stages, cfg.steps)
    parse_tokenizer_spec(cfg.tokenizer)
    run_dir = Path(cfg.out)
    _check_run_dir(run_dir, cfg.resume)
    created_run_dir = not run_dir.exists()
    distributed.init()
    try:
        _train(cfg, ds, run_dir, started)
    except UserError:
        # Bad input found before the first checkpoint: leave no half-written run dir behind.
        if rank == 0 and created_run_dir and checkpoint.latest_complete(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train(cfg: RunConfig, ds: DsSettings, run_dir: Path, started: float) -> None:
    data = prepare_run_data(cfg, run_dir)
    model_config = load_model_spec(cfg.model, vocab_size=data.tokenizer.vocab_size)
    seq_len = _seq_len(cfg, model_config)
    engine = build_engine(cfg.method, build_pipeline_module(model_config, cfg.stages, cfg.seed), ds.config)
    stage, dp_rank = engine.stage_id, engine.grid.data_parallel_id
    sampler = MicroBatchSampler(data.train_tokens, seq_len, ds.micro_batch_size, cfg.seed,
                                dp_rank=dp_rank, dp_size=ds.data_parallel)
    # Periodic evaluations use a fixed subset spread over the held-out split; the final one
    # uses the whole split unless --final_eval_batches caps it.
    eval_set = EvalBatches(data.val_tokens, seq_len, ds.micro_batch_size, cfg.eval_batches * ds.data_parallel)
    final_eval_set = EvalBatches(data.val_tokens, seq_len, ds.micro_batch_size,
                                 (cfg.final_eval_batches or 10**9) * ds.data_parallel)
    meta = _run_meta(cfg, ds, seq_len, data)

    start_step = _maybe_resume(engine, run_dir, cfg.resume, meta)
    if start_step >= ds.steps:
        if dist.get_rank() == 0:
            print(f"bll-ds: {run_dir} is already complete at step {start_step} (see summary.json); "
                  f"pass a larger --steps to train on.", flush=True)
        return
    tokens_per_step = ds.train_batch_size * seq_len
    log = MetricsLog(run_dir, enabled=dist.get_rank() == 0, total_steps=ds.steps, start_step=start_step,
                     progress=cfg.progress)
    log.print(f"bll-ds: {cfg.method} | {cfg.stages} stages x {ds.data_parallel} replicas | "
              f"{count_parameters(model_config) / 1e6:.2f}M params | vocab {model_config.vocab_size} | "
              f"{ds.micro_batches} micro-batches x {ds.micro_batch_size} x {seq_len} tokens | "
              f"steps {start_step}->{ds.steps} | {run_dir}")

    step_times, val_loss, last_ckpt = [], None, checkpoint.latest_complete(run_dir)
    train_started = time.time()
    for step in range(start_step, ds.steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist.get_rank())  # exact resume with dropout
        micro_batches = iter([sampler.get(step, m, ds.micro_batches) for m in range(ds.micro_batches)])
        t0 = time.perf_counter()
        loss = engine.train_batch(micro_batches).item()
        step_s = time.perf_counter() - t0
        busy_s, idle_s = engine.accounting.end_step(step_s)
        step_times.append(step_s)
        done = step + 1
        if not torch.isfinite(torch.tensor(loss)):
            raise UserError(f"the training loss is {loss} at step {done} (stage {stage} reports it).",
                            f"resume from the last good checkpoint ({last_ckpt[0] if last_ckpt else 'none'}) "
                            "with a lower learning rate or tighter gradient clipping.")
        log.step_done(loss, tokens_per_step / step_s)
        if done % cfg.log_interval == 0 or done == ds.steps:
            timings = _gather_stage_timings(busy_s, idle_s, cfg.stages, ds.data_parallel)
            log.log(done, {"train/loss": loss, "train/lr": engine.get_lr()[0],
                           "train/tokens_per_s": tokens_per_step / step_s,
                           "train/tokens_seen": done * tokens_per_step, **timings})
        if cfg.eval_interval and done % cfg.eval_interval == 0 and done < ds.steps:
            val_loss = _evaluate(engine, eval_set, ds.data_parallel, dp_rank)
            log.log(done, {"val/loss": val_loss})
        exiting = bool(cfg.exit_interval) and done % cfg.exit_interval == 0 and done < ds.steps
        if (cfg.save_interval and done % cfg.save_interval == 0) or done == ds.steps or exiting:
            checkpoint.save(engine, run_dir, done, meta, cfg.keep_checkpoints)
            last_ckpt = (checkpoint.tag_for(done), meta)
        if exiting:
            log.print(f"exit_interval: stopped after step {done}; continue with --resume")
            log.close()
            return
    train_wall_s = time.time() - train_started

    if ds.steps > start_step or val_loss is None:
        val_loss = _evaluate(engine, final_eval_set, ds.data_parallel, dp_rank)
        log.log(ds.steps, {"val/loss": val_loss})
    stage_summaries = _gather_objects({**engine.accounting.summary(), "params_sha256": _params_digest(engine.module)})
    warm = step_times[cfg.throughput_warmup_steps:] or step_times
    if dist.get_rank() == 0:
        write_summary(run_dir, {
            "method": cfg.method, "stages": cfg.stages, "dp": ds.data_parallel,
            "params": count_parameters(model_config), "steps": ds.steps, "resumed_from_step": start_step,
            "tokens_seen": ds.steps * tokens_per_step, "tokens_per_step": tokens_per_step,
            "wall_s": round(time.time() - started, 2), "train_wall_s": round(train_wall_s, 2),
            "tokens_per_s": round(tokens_per_step / statistics.median(warm), 1) if warm else None,
            "step_s_median": round(statistics.median(warm), 5) if warm else None,
            "val_loss": round(val_loss, 5), "seq_len": seq_len, "micro_batches": ds.micro_batches,
            "micro_batch_size": ds.micro_batch_size, "bf16": ds.bf16,
            "device": str(engine.device), "stage_layout": "per stage: data-parallel replica 0",
            "stages_detail": [{**s, "replicas_identical": len({r["params_sha256"] for r in stage_summaries
                                                                 if r["stage"] == s["stage"]}) == 1}
                              for s in stage_summaries if s["dp_rank"] == 0],
        })
    log.print(f"done: val_loss={val_loss:.4f} | summary in {run_dir / 'summary.json'}")
    log.close()


def _seq_len(cfg: RunConfig, model_config) -> int:
    context = model_config.max_position_embeddings
    seq_len = cfg.seq_len or context
    if not 1 <= seq_len <= context:
        raise UserError(f"--seq_len {seq_len} does not fit the model's context of {context} positions.",
                        f"pass --seq_len between 1 and {context}, or raise the spec's context length.")
    return seq_len


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    has_checkpoint = (run_dir / "checkpoints" / checkpoint.LATEST).is_file()
    if resume and not has_checkpoint:
        raise UserError(f"--resume was given but {run_dir} holds no complete checkpoint.",
                        "drop --resume to start a new run, or point --out at the run to continue.")
    if not resume and has_checkpoint:
        raise UserError(f"{run_dir} already holds a run with checkpoints.",
                        "pass --resume to continue it, or choose a new --out.")


def _run_meta(cfg: RunConfig, ds: DsSettings, seq_len: int, data) -> dict:
    return {"method": cfg.method, "stages": cfg.stages, "data_parallel": ds.data_parallel,
            "model_spec_sha256": hashlib.sha256(Path(cfg.model).read_bytes()).hexdigest(),
            "tokenizer_sha256": data.tokenizer.fingerprint, "micro_batch_size": ds.micro_batch_size,
            "micro_batches": ds.micro_batches, "seq_len": seq_len, "seed": cfg.seed, "data": cfg.data}


def _maybe_resume(engine, run_dir: Path, resume: bool, meta: dict) -> int:
    if not resume:
        return 0
    removed = checkpoint.remove_incomplete(run_dir) if dist.get_rank() == 0 else []
    if removed:
        print(f"bll-ds: removed incomplete checkpoint folders {removed}", flush=True)
    dist.barrier()
    tag, saved = checkpoint.latest_complete(run_dir)
    checkpoint.check_compatible(saved, meta, run_dir)
    distributed.agree_on_errors(checkpoint.load, engine, run_dir, tag)
    return int(saved["step"])


def _evaluate(engine, eval_set: EvalBatches, dp: int, dp_rank: int) -> float:
    """Mean held-out loss of the full forward network; replicas take equal interleaved shares."""
    batches = list(eval_set)
    mine = batches[dp_rank:(len(batches) // dp) * dp:dp]
    with engine.accounting.paused():
        loss = engine.eval_batch(iter(mine), num_micro_batches=len(mine))
    return float(loss)


def _params_digest(module) -> str:
    """Hash of this rank's weights: data-parallel replicas of a stage must agree bit for bit."""
    digest = hashlib.sha256()
    for name, param in module.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _gather_stage_timings(busy_s: float, idle_s: float, stages: int, dp: int) -> dict[str, float]:
    """Last step's busy/idle seconds of every stage (data-parallel replica 0), for TensorBoard."""
    local = torch.tensor([busy_s, idle_s], dtype=torch.float64)
    everyone = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    torch.distributed.all_gather(everyone, local)
    out = {}
    for s in range(stages):
        busy, idle = everyone[s * dp].tolist()  # PipeDataParallelTopology: rank = stage * dp + replica
        out[f"stage{s}/busy_s"], out[f"stage{s}/idle_s"] = busy, idle
    return out


if __name__ == "__main__":
    sys.exit(main())
