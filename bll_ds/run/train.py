"""The training entry: compose config, data, model, engine, checkpoints and metrics.

Launch through scripts/pretrain.py with the deepspeed runner. The loop in `train()` is the whole
story of a step: fetch deterministic micro-batches, let the engine run its schedule, account
time, log, evaluate, checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import deepspeed.comm as dist

from deepspeed.accelerator import get_accelerator

from bll_ds.data import EvalBatches, MicroBatchSampler, parse_tokenizer_spec
from bll_ds.data.prepare import prepare_run_data
from bll_ds.infra import distributed
from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.errors import UserError
from bll_ds.infra.storage import check_cache_dir, check_run_dir_storage
from bll_ds.measure.matmul_peak import best_of, matmul_peaks
from bll_ds.metrics import MetricsLog, build_summary, log_step_records, write_summary
from bll_ds.metrics.monitors import build_monitors, take_monitor_sections
from bll_ds.modeling import build_pipeline_module, check_stages, count_parameters, load_model_spec
from bll_ds.pipeline import build_engine
from bll_ds.pipeline.emulated.emulator import EmulatedPipeline, emulation_device
from bll_ds.pipeline.launched import link_delay
from bll_ds.pipeline.trace import StageTracer
from bll_ds.run import checkpoint, run_lock
from bll_ds.run import run_dir as names
from bll_ds.run.config import RunConfig, parse_run_config, resolve_seq_len
from bll_ds.run.ds_config import DsSettings, bf16_pays_off, load_ds_config
from bll_ds.run.job_control import JobControl
from bll_ds.run.nonfinite_policy import NonFinitePolicy


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """`started`: when the process began (scripts/pretrain.py passes it before its imports), so
    summary.json's wall_s covers start-up too."""
    started = started or time.time()
    try:
        cfg = parse_run_config(argv)
        rank, _ = distributed.launch_env()
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    _say(rank, started, f"{cfg.method} on {cfg.stages} stages{' (emulated)' if cfg.emulate else ''} -> {cfg.out}: "
                        f"checking the configs")
    try:
        train(cfg, started)
    except UserError as err:
        if rank == 0 or err.rank_local:
            print(f"bll-ds: error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        words = distributed.peer_lost(err)
        if words is None:
            raise
        # Another rank stopped (its own error is printed above) or died: one line, not a wall
        # of communication-library frames that hides the cause.
        print(f"bll-ds: error: rank {rank} lost its connection to another rank, which stopped or died "
              f"(\"{words}\"). Fix: see that rank's error above; a killed run continues with --resume.",
              file=sys.stderr, flush=True)
        return 3
    # No barrier on the error paths: after a failure on one rank the others may be blocked in a
    # receive that will never complete, and a barrier would keep this process alive with them.
    # Exiting non-zero lets the deepspeed launcher stop every rank.
    distributed.shutdown()
    return 0


def train(cfg: RunConfig, started: float) -> None:
    rank, world = distributed.launch_env()
    # Fail on bad input before any process group, file or thread exists.
    spec = load_model_spec(cfg.model)
    check_stages(spec, cfg.stages)
    resolve_seq_len(cfg, spec)
    if cfg.emulate and world > 1:
        raise UserError(f"--emulate trains all {cfg.stages} stages in one process, but this is one of {world} "
                        f"launched ranks.",
                        "run it with python, not a launcher: python scripts/pretrain.py --emulate ...")
    # The emulator is S ranks of one replica each, in one process.
    ds = load_ds_config(cfg.deepspeed_config, cfg.stages if cfg.emulate else world, cfg.stages, cfg.steps,
                        defer_bf16_auto=True, overrides=cfg.ds_set)
    parse_tokenizer_spec(cfg.tokenizer)
    run_dir = Path(cfg.out)
    check_run_dir_storage(run_dir, count_parameters(spec), cfg.checkpoint.keep)
    check_cache_dir(cfg.cache_dir)
    if cfg.link_delay_ms and cfg.emulate:
        raise UserError("--link_delay_ms delays messages between launched ranks; the emulator has none.",
                        "launch the stages (deepspeed/torchrun) to time a slow link, or model it with "
                        "python -m bll_bench simulate --latency_us.")
    distributed.init(all_cores=cfg.emulate)
    # One writer per run dir, before anything in it is read for the run or written: rank 0 takes
    # the lock, every rank gets its verdict (bll_ds/run/run_lock.py).
    held = {}

    def take_lock() -> bool:
        held["lock"] = run_lock.acquire(run_dir)
        return held["lock"].created_dir

    created_run_dir = distributed.rank0_then_broadcast(take_lock)
    link_delay.install(cfg.link_delay_ms)
    try:
        resume = _check_run_dir(run_dir, cfg.checkpoint.resume)
        if resume and cfg.init_from:
            raise UserError(f"--init_from {cfg.init_from} starts a run from other weights, but {run_dir} is resumed "
                            f"from its own checkpoint.", "drop --init_from when resuming, or choose a new --out.")
        _train(cfg, ds, run_dir, started, resume)
    except UserError:
        # Bad input found before the first checkpoint: leave no half-written run dir behind.
        if rank == 0 and created_run_dir and checkpoint.latest_complete(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        link_delay.uninstall()
        if "lock" in held:
            held["lock"].release()


def _train(cfg: RunConfig, ds: DsSettings, run_dir: Path, started: float, resume: bool) -> None:
    if ds.bf16_auto:  # decided once, on rank 0: every stage must agree on the activations' dtype
        ds.resolve_bf16_auto(*distributed.rank0_then_broadcast(
            bf16_pays_off, emulation_device() if cfg.emulate else get_accelerator().current_device_name(),
            cfg.cache_dir))
    monitor_sections = take_monitor_sections(ds.config)
    data = prepare_run_data(cfg, run_dir)
    model_config = load_model_spec(cfg.model, vocab_size=data.tokenizer.vocab_size)
    seq_len = resolve_seq_len(cfg, model_config)
    meta = _run_meta(cfg, ds, seq_len, data)
    # A resume that would be refused is refused here, before this launch's configs replace the
    # run's: a refused run leaves the run dir as it was.
    resumed_from = _check_resume(run_dir, resume, meta, ds)
    resolved = {**dataclasses.asdict(cfg), "steps": ds.steps, "seq_len": seq_len}  # run_config.json, W&B
    if dist.get_rank() == 0:
        # The resolved model (the tokenizer sets the vocabulary): what evaluate/export/generate
        # rebuild from the checkpoint, without the spec file the run was started with. And this
        # launch's resolved configs, as a later reader (or a requeued job) needs them.
        atomic_write_text(run_dir / names.MODEL_CONFIG, model_config.to_json_string())
        atomic_write_text(run_dir / names.RUN_CONFIG, json.dumps(resolved, indent=2) + "\n")
        saved = {**ds.config, **monitor_sections}
        if ds.bf16_auto_peaks is not None:  # why "auto" chose what it did
            saved["bf16_auto_measured_gflops"] = ds.bf16_auto_peaks
        atomic_write_text(run_dir / names.DS_CONFIG, json.dumps(saved, indent=2) + "\n")
    checkpointing = cfg.activation_checkpoint_interval
    params = count_parameters(model_config)  # builds the model on the meta device: once, for both lines
    _say(dist.get_rank(), started, f"building the {'emulated ' if cfg.emulate else ''}pipeline: "
                                   f"{params / 1e6:.2f}M parameters in {cfg.stages} stages")
    if cfg.emulate:
        engine = EmulatedPipeline(cfg.method, model_config, cfg.stages, ds, cfg.seed, cfg.bll,
                                  activation_checkpoint_interval=checkpointing)
    else:
        module = build_pipeline_module(model_config, cfg.stages, cfg.seed, activation_checkpoint_interval=checkpointing)
        engine = build_engine(cfg.method, module, ds.config, model_config, cfg.seed, cfg.bll)
    if cfg.init_from and not resume:
        from bll_ds.run import init_weights

        # Every rank reads its own layers: a damaged file seen by one rank is reported on all.
        loaded = distributed.agree_on_errors(init_weights.load_into, engine, cfg.init_from, model_config)
        if dist.get_rank() == 0:
            print(f"bll-ds: init_from {cfg.init_from}: {loaded}", flush=True)
    stage, dp_rank = engine.stage_id, engine.grid.data_parallel_id
    sampler = MicroBatchSampler(data.train_tokens, seq_len, ds.micro_batch_size, cfg.seed,
                                dp_rank=dp_rank, dp_size=ds.data_parallel)
    # Periodic evaluations use a fixed subset spread over the held-out split; the final one
    # uses the whole split unless --final_eval_batches caps it.
    eval_set = EvalBatches(data.val_tokens, seq_len, ds.micro_batch_size, cfg.eval.batches * ds.data_parallel)
    final_eval_set = EvalBatches(data.val_tokens, seq_len, ds.micro_batch_size,
                                 (cfg.eval.final_batches or 10**9) * ds.data_parallel)

    start_step = _resume(engine, run_dir, resumed_from)
    if start_step >= ds.steps:
        if dist.get_rank() == 0:
            print(f"bll-ds: {run_dir} is already complete at step {start_step} (see summary.json); "
                  f"to train on, start a new --out with --init_from {run_dir} and a new --steps.", flush=True)
        return
    engine.start_feedback(start_step)
    engine.tracer = StageTracer(stage, _trace_window(cfg, start_step), engine.device)
    tokens_per_step = ds.train_batch_size * seq_len
    is_logger = dist.get_rank() == engine.grid.stage_to_global(cfg.stages - 1, data=0)
    monitors = build_monitors(monitor_sections, run_dir, resolved) \
        if is_logger else []
    log = MetricsLog(run_dir / names.METRICS, run_dir / names.TENSORBOARD, is_logger, start_step,
                     ds.steps if cfg.metrics.progress else None, monitors=monitors, tokens_per_step=tokens_per_step)
    # One stage log and non-finite policy per stage this process trains (the emulator: all).
    stage_logs = {k: MetricsLog(names.stage_metrics(run_dir, k), names.stage_tensorboard(run_dir, k),
                                dp_rank == 0, start_step) for k in engine.local_stages}
    on_nonfinite = {k: NonFinitePolicy(cfg.nonfinite.policy, cfg.nonfinite.max_consecutive_skips, k, run_dir,
                                       stage_logs[k].print, cfg.deepspeed_config) for k in engine.local_stages}
    log.print(f"bll-ds: {cfg.method}{'/' + cfg.bll.variant if cfg.method == 'bll' else ''} | "
              f"{cfg.stages} stages x {ds.data_parallel} replicas | "
              f"{params / 1e6:.2f}M params | vocab {model_config.vocab_size} | "
              f"{ds.micro_batches} micro-batches x {ds.micro_batch_size} x {seq_len} tokens | "
              f"steps {start_step}->{ds.steps} | {run_dir}")

    job = JobControl(cfg.checkpoint.exit_duration_mins, started)
    step, step_times, val_loss = start_step, [], None
    recent = {k: [] for k in engine.local_stages}
    train_started = time.time()
    while step < ds.steps:
        n = _call_length(step, cfg, ds.steps)
        logged = [s for s in range(step + 1, step + n + 1) if s % cfg.metrics.log_interval == 0 or s == ds.steps]
        by_stage = engine.train_steps(step, n, sampler.get, track_update_at=logged, on_step=log.advance)
        for k, stage_records in by_stage.items():
            on_nonfinite[k].check(stage_records)  # rank-local: the engine already agreed with who shares the update
            recent[k] = (recent[k] + [r for r in stage_records if r.nonfinite is None])[-10:]
            log_step_records([r for r in stage_records if r.step in logged or r.nonfinite],
                             log if k == stage else None, stage_logs[k], tokens_per_step)
        records = by_stage[stage]
        step += n
        step_times += [r.step_s for r in records]
        if cfg.eval.interval and step % cfg.eval.interval == 0 and step < ds.steps:
            val_loss = _evaluate(engine, eval_set, ds.data_parallel, dp_rank)
            log.log(step, {"val/loss": val_loss})
        saving = cfg.checkpoint
        exiting = bool(saving.exit_interval) and step % saving.exit_interval == 0 and step < ds.steps
        stop_reason = job.stop_reason(engine.device) if step < ds.steps else None  # a collective
        exiting = exiting or stop_reason is not None
        if (saving.save_interval and step % saving.save_interval == 0) or step == ds.steps or exiting:
            checkpoint.save(engine, run_dir, step, meta, saving.keep)
        if exiting:
            why = stop_reason or "exit_interval"
            log.print(f"bll-ds: {why}: stopped after step {step} with a checkpoint; continue with --resume auto")
            job.close()
            _close(log, *stage_logs.values())
            return
    job.close()
    train_wall_s = time.time() - train_started
    if dp_rank == 0 and engine.tracer.events:
        engine.tracer.dump(run_dir)
    # The matrix-product peak, measured before and after the final evaluation, the best kept: a
    # neighbour's evaluation or drain can share the core during one of the two. Not at start-up,
    # where it would delay the first step.
    peaks = matmul_peaks(engine.device) if cfg.metrics.measure_matmul_peak else None
    val_loss = _evaluate(engine, final_eval_set, ds.data_parallel, dp_rank)
    log.log(ds.steps, {"val/loss": val_loss})
    if peaks is not None:
        peaks = best_of(peaks, matmul_peaks(engine.device))
    summary = build_summary(cfg, ds, engine, model_config, recent, step_times, seq_len, start_step, val_loss,
                            started, wall_s=time.time() - started, train_wall_s=train_wall_s,
                            matmul_peak_gflops=peaks, startup_s=train_started - started)
    if is_logger:
        write_summary(run_dir, summary)
    if summary["model_gflops_per_s"] is None:
        log.print(f"bll-ds: model_gflops_per_s, mfu, mfu_measured_peak and bll_overhead_flops_share are null in "
                  f"summary.json: BLL variant {cfg.bll.variant!r} declares no readout FLOPs (readout_flops_per_token)")
    log.print(f"done: val_loss={val_loss:.4f} | summary in {run_dir / 'summary.json'}")
    _close(log, *stage_logs.values())


def _say(rank: int, started: float, what: str) -> None:
    """Rank 0: what start-up is doing now, with the seconds since the process began, so that a
    slow start is told from a hung one."""
    if rank == 0:
        print(f"bll-ds: [{time.time() - started:4.1f}s] {what}", flush=True)


def _close(*logs: MetricsLog) -> None:
    for log in logs:
        log.close()


def _trace_window(cfg: RunConfig, start_step: int) -> range:
    """The last `trace_steps` steps of this process's throughput warm-up (so the tracing cost
    never enters tokens/s), and never the first step, which pays one-time costs."""
    warmup, traced = cfg.metrics.throughput_warmup_steps, cfg.metrics.trace_steps
    first = max(2, warmup - traced + 1)
    last = max(warmup, first + min(traced, 1) - 1)
    return range(start_step + first, start_step + last + 1)


def _call_length(step: int, cfg: RunConfig, total: int) -> int:
    """Steps in the next engine call: block-local learning runs up to --bll_steps_per_call
    without a flush; backprop flushes every step anyway (1F1B), so it runs one. A call ends at
    the next evaluation, checkpoint or exit step so those always see a drained pipe."""
    n = min(cfg.bll.steps_per_call if cfg.method == "bll" else 1, total - step)
    for interval in (cfg.eval.interval, cfg.checkpoint.save_interval, cfg.checkpoint.exit_interval):
        if interval:
            n = min(n, interval - step % interval)
    return max(n, 1)


def _check_run_dir(run_dir: Path, resume: str) -> bool:
    """Whether this launch resumes (--resume yes|no|auto against what the run dir holds)."""
    has_checkpoint = (names.checkpoints(run_dir) / checkpoint.LATEST).is_file()
    if resume == "yes" and not has_checkpoint:
        raise UserError(f"--resume was given but {run_dir} holds no complete checkpoint.",
                        "drop --resume to start a new run, pass --resume auto to start it when there is none, "
                        "or point --out at the run to continue.")
    if resume == "no" and has_checkpoint:
        raise UserError(f"{run_dir} already holds a run with checkpoints.",
                        "pass --resume (or --resume auto) to continue it, or choose a new --out.")
    return has_checkpoint


def _run_meta(cfg: RunConfig, ds: DsSettings, seq_len: int, data) -> dict:
    return {"method": cfg.method, "stages": cfg.stages, "data_parallel": ds.data_parallel,
            "model_spec_sha256": hashlib.sha256(Path(cfg.model).read_bytes()).hexdigest(),
            "tokenizer_sha256": data.tokenizer.fingerprint, "micro_batch_size": ds.micro_batch_size,
            "micro_batches": ds.micro_batches, "seq_len": seq_len, "seed": cfg.seed, "data": cfg.data,
            "bll_variant": cfg.bll.variant if cfg.method == "bll" else None, "emulated": cfg.emulate,
            "steps": ds.steps, "init_from": cfg.init_from, "text_field": cfg.text_field}


def _check_resume(run_dir: Path, resume: bool, meta: dict, ds: DsSettings) -> tuple[str, int] | None:
    """The checkpoint a resumed run continues from (tag, step), after every check that can refuse
    it; None for a new run. Reads only."""
    if not resume:
        return None
    tag, saved = checkpoint.latest_complete(run_dir)
    checkpoint.check_compatible(saved, meta, run_dir, checkpoint.holds_sharded_optimizer(run_dir, tag))
    checkpoint.check_schedule_length(saved, meta, ds.config, run_dir)
    return tag, int(saved["step"])


def _resume(engine, run_dir: Path, resumed_from: tuple[str, int] | None) -> int:
    if resumed_from is None:
        return 0
    tag, step = resumed_from
    removed = checkpoint.remove_incomplete(run_dir) if dist.get_rank() == 0 else []
    if removed:
        print(f"bll-ds: removed incomplete checkpoint folders {removed}", flush=True)
    dist.barrier()
    distributed.agree_on_errors(checkpoint.load, engine, run_dir, tag)
    return step


def _evaluate(engine, eval_set: EvalBatches, dp: int, dp_rank: int) -> float:
    """Mean held-out loss of the full forward network; replicas take equal interleaved shares."""
    batches = list(eval_set)
    mine = batches[dp_rank:(len(batches) // dp) * dp:dp]
    with engine.accounting.paused():
        loss = engine.eval_batch(iter(mine), num_micro_batches=len(mine))
    return float(loss)


if __name__ == "__main__":
    sys.exit(main())
