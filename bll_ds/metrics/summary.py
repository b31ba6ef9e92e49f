"""summary.json: the run's figures, assembled once at its end from every rank's stage summary."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import torch

from bll_ds.infra.atomic import atomic_write_text
from bll_ds.measure.device_peak import datasheet_peak, training_dtype
from bll_ds.measure.flops import NotModelled, stage_step_flops
from bll_ds.modeling import count_parameters
from bll_ds.run.run_dir import SUMMARY


def build_summary(cfg, ds, engine, model_config, recent, step_times, seq_len: int, start_step: int,
                  val_loss: float, started: float, wall_s: float, train_wall_s: float,
                  matmul_peak_gflops: dict | None, startup_s: float | None = None) -> dict:
    """Gathers every rank's stage summaries: the run's one collective outside evaluation and
    checkpoints, at its very end. `recent`: per local stage, its last applied StepRecords;
    `step_times`: every step's seconds on this rank (the warm-up ones are left out of the medians)."""
    warm = step_times[cfg.metrics.throughput_warmup_steps:] or step_times
    tokens_per_step = ds.train_batch_size * seq_len
    mine = [_stage_summary(cfg, ds, view, model_config, recent[view.stage_id], seq_len, statistics.median(warm),
                           matmul_peak_gflops, engine.device) for view in engine.stage_views()]
    stage_summaries = [s for part in _gather_objects(mine) for s in part]
    first_replica = [s for s in stage_summaries if s["dp_rank"] == 0]
    return {
        "method": cfg.method, "bll_variant": cfg.bll.variant if cfg.method == "bll" else None,
        "on_nonfinite": cfg.nonfinite.policy,
        "stages": cfg.stages, "dp": ds.data_parallel,
        "params": count_parameters(model_config), "steps": ds.steps, "resumed_from_step": start_step,
        "tokens_seen": ds.steps * tokens_per_step, "tokens_per_step": tokens_per_step,
        "started_at": round(started, 3), "wall_s": round(wall_s, 2), "train_wall_s": round(train_wall_s, 2),
        # Process start to the first step: imports, process group, data, engine, resume, matmul peak.
        "startup_s": round(startup_s, 2) if startup_s is not None else None,
        "tokens_per_s": round(tokens_per_step / statistics.median(warm), 1),
        "step_s_median": round(statistics.median(warm), 5),
        # The whole pipeline's model FLOP/s per replica (local readouts and feedback counted as work).
        "model_gflops_per_s": _total(s["model_gflops_per_s"] for s in first_replica),
        # MFU as published figures (PaLM, Megatron-LM, torchtitan) state it, over the devices one replica
        # uses, and the same over the matmul peak this run measured; mfu_basis says which peaks.
        **pipeline_mfu(first_replica, cfg.emulate),
        "val_loss": round(val_loss, 5), "seq_len": seq_len, "micro_batches": ds.micro_batches,
        "micro_batch_size": ds.micro_batch_size, "bf16": ds.bf16,
        "device": str(engine.device), "emulated": cfg.emulate, "link_delay_ms": cfg.link_delay_ms,
        "stage_layout": "per stage: data-parallel replica 0; tokens_per_s and step times from the last stage"
        + ("; emulated in one process: stages run one after another, busy_s is each stage's own compute"
           if cfg.emulate else ""),
        "stages_detail": [{**s, "replicas_identical": len({r["params_sha256"] for r in stage_summaries
                                                             if r["stage"] == s["stage"]}) == 1}
                          for s in first_replica],
    }


def _total(values) -> float | None:
    values = list(values)
    return None if None in values else round(sum(values), 2)


def _stage_summary(cfg, ds, view, model_config, recent, seq_len: int, step_s: float, peaks: dict | None,
                   device) -> dict:
    """One stage's part of summary.json; `view` is a launched engine or an emulated stage."""
    out = {**view.accounting.summary(), "params_sha256": params_digest(view.module),
           "activation_peak_mb": view.tracer.activation_peak_mb, "matmul_peak_gflops": peaks,
           "local_loss": round(statistics.mean(r.loss for r in recent), 5) if recent else None,
           "local_terms": {k: round(statistics.mean(r.terms[k] for r in recent), 5)
                           for k in (recent[-1].terms if recent else {})},
           "skipped_steps": view.skipped_steps}
    out.update(flop_rates(cfg, ds, view.stage_id, model_config, seq_len, step_s, peaks, device))
    return out


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY, json.dumps(summary, indent=2) + "\n")


def run_dtype(ds, device) -> str:
    """The dtype whose peak bounds this run's matrix products (device_peak.training_dtype): bf16 or
    fp16 as the DeepSpeed config enables them, else tf32 or fp32 as torch lets cuBLAS run fp32
    products (a CPU has no tf32)."""
    fp16 = bool(ds.config.get("fp16", {}).get("enabled", False))
    return training_dtype(ds.bf16, fp16, allow_tf32=None if torch.device(device).type == "cuda" else False)


# The measured peaks (matmul_peak.matmul_peaks) per run dtype: an fp32 product runs in tf32 where
# torch allows it, in the measurement as in training; fp16 is not measured.
_MEASURED_KEY = {"bf16": "bf16", "tf32": "fp32", "fp32": "fp32"}


def flop_rates(cfg, ds, stage: int, model_config, seq_len: int, step_s: float, peaks: dict | None,
               device="cpu") -> dict:
    """This stage's model FLOP/s over the median step, and two utilisations of it in the run's
    dtype: `mfu`, over the device's datasheet dense peak (device_peak.py; None on a CPU or a
    device the table does not know, and `mfu_peaks.why_no_datasheet` says which), and
    `mfu_measured_peak`, over the matmul peak measured in this run (None without the
    measurement). BLL stages count their local readout and feedback update as work; see
    bll_ds/measure/flops.py for the conventions. The FLOP figures are None for a variant that
    declares no readout FLOPs."""
    dtype = run_dtype(ds, device)
    sheet = datasheet_peak(device, dtype)
    measured = (peaks or {}).get(_MEASURED_KEY.get(dtype, ""))
    out = {"mfu_peaks": {"dtype": dtype, "device_name": sheet["device_name"], "datasheet_tflops": sheet["tflops"],
                         "measured_gflops": measured, "why_no_datasheet": sheet["why_none"]}}
    try:
        per_step = stage_step_flops(model_config, cfg.stages, seq_len, cfg.method, cfg.bll.variant,
                                    ds.micro_batch_size * seq_len, ds.micro_batches)[stage]
    except NotModelled:
        return {**out, "model_gflops_per_s": None, "mfu": None, "mfu_measured_peak": None,
                "bll_overhead_flops_share": None}
    gflops = per_step.total / step_s / 1e9
    return {**out, "model_gflops_per_s": round(gflops, 2),
            "mfu": round(gflops / (sheet["tflops"] * 1e3), 4) if sheet["tflops"] else None,
            "mfu_measured_peak": round(gflops / measured, 4) if measured else None,
            "bll_overhead_flops_share": round(per_step.bll_overhead_share, 5)}


def pipeline_mfu(stages: list[dict], emulated: bool) -> dict:
    """One replica's MFU: its model FLOP/s over the peaks of the devices it runs on. Launched,
    each stage has its own device, so the denominator sums the stages' peaks (the mean of their
    utilisations where the devices match); emulated, every stage shares one device, so it is that
    device's peak (the sum of the stages' utilisations). `stages`: flop_rates' figures per stage."""
    gflops = _total(s["model_gflops_per_s"] for s in stages)
    devices = [s["mfu_peaks"] for s in (stages[:1] if emulated else stages)]

    def ratio(peaks: list) -> float | None:
        return None if gflops is None or not peaks or not all(peaks) else round(gflops / sum(peaks), 4)

    mfu = ratio([p["datasheet_tflops"] * 1e3 if p["datasheet_tflops"] else None for p in devices])
    measured = ratio([p["measured_gflops"] for p in devices])
    first = devices[0]
    where = "one device (emulated)" if emulated else f"{len(devices)} device(s), one per stage"
    if gflops is None:
        basis = "mfu, mfu_measured_peak: null, the variant declares no readout FLOPs"
    else:
        if mfu is not None:
            basis = (f"mfu: model FLOP/s over the datasheet dense {first['dtype']} peak of {first['device_name']} "
                     f"({first['datasheet_tflops']} TFLOP/s) on {where}")
        else:
            basis = "mfu: null, " + next(p["why_no_datasheet"] for p in devices if p["why_no_datasheet"])
        basis += (f"; mfu_measured_peak: over the {first['dtype']} matmul peak measured in this run on {where}"
                  if measured is not None else f"; mfu_measured_peak: null, no {first['dtype']} peak measured")
    return {"mfu": mfu, "mfu_measured_peak": measured, "mfu_basis": basis}


def params_digest(module) -> str:
    """Hash of this rank's weights: data-parallel replicas of a stage must agree bit for bit."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        # A module's extra state (the -man readouts' fp32 average) is a dict; its tensors count too.
        parts = value.items() if isinstance(value, dict) else [("", value)]
        for key, tensor in parts:
            if torch.is_tensor(tensor):
                digest.update((name + key).encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gather_objects(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
