"""Checkpoints that are never half-visible.

Layout under RUN_DIR/checkpoints/:
    step_000500/            DeepSpeed's own files (per-layer weights, per-rank optimizer state)
    step_000500/complete.json   written by rank 0 after every rank finished saving
    latest                  name of the newest complete checkpoint, replaced atomically

DeepSpeed is asked not to write its own `latest` (save_latest=False): a run killed while ranks
are still writing must leave `latest` on the previous checkpoint. `complete.json` also records
what the run was (stages, replicas, model, tokenizer, batch shape), so a resume into a different
launch is refused with a clear message instead of loading mismatched shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepspeed.comm as dist
import torch

from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.errors import UserError
from bll_ds.run.resumed_settings import configured_hyperparameters_win, optimizers_and_schedulers
from bll_ds.run import run_dir as names

MARKER = names.COMPLETE_MARKER
LATEST = names.LATEST
tag_for = names.checkpoint_tag


def save(engine, run_dir: Path, step: int, meta: dict, keep: int) -> str:
    ckpt_dir = names.checkpoints(run_dir)
    tag = tag_for(step)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        extra = engine.extra_state()  # block-local state DeepSpeed does not know: feedback weights, tables
        if extra is not None and engine.grid.data_parallel_id == 0:
            torch.save(extra, ckpt_dir / tag / names.block_local_state(engine.stage_id))
    except OSError as err:  # a full disk, a lost mount: this checkpoint never becomes `latest`
        last = latest_complete(run_dir)
        raise UserError(f"writing checkpoint {ckpt_dir / tag} failed: {err.strerror or err}.",
                        f"free space on that filesystem, then --resume from "
                        f"{last[0] if last else 'the start (no complete checkpoint yet)'}.", rank_local=True) from None
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_text(ckpt_dir / tag / MARKER, json.dumps({**meta, "step": step}, indent=2))
        atomic_write_text(ckpt_dir / LATEST, tag)
        _prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep: int) -> None:
    complete = sorted(p for p in ckpt_dir.glob("step_*") if (p / MARKER).is_file())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_complete(run_dir: Path) -> tuple[str, dict] | None:
    """(tag, meta) of the checkpoint `latest` names, or None if the run has none."""
    ckpt_dir = names.checkpoints(run_dir)
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    marker = ckpt_dir / tag / MARKER
    try:
        return tag, json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{latest} names checkpoint {tag!r}, but {marker} is missing or corrupt.",
                        f"point {latest} at an earlier complete step_* folder, or start a new --out.") from None


# What each resume-consistency key is given by, for the fix: (what differs, how to give the run's).
_GIVEN_BY = {
    "method": ("the method", "--method {saved}"),
    "bll_variant": ("the BLL variant", "--bll_variant {saved}"),
    "stages": ("the number of stages", "--stages {saved}"),
    "data_parallel": ("the global batch", "launch {saved} replica(s) per stage (ranks = stages x replicas), or keep "
                      "replicas x train_micro_batch_size_per_gpu and gradient_accumulation_steps as the run has them"),
    "model_spec_sha256": ("the model spec", "pass the spec the run started with (run_config.json "
                          "names it; its sha256 began {short})"),
    "tokenizer_sha256": ("the tokenizer", "pass the --tokenizer and --data the run started with "
                         "(run_config.json)"),
    "micro_batch_size": ("the micro-batch size", "set train_micro_batch_size_per_gpu to {saved} in the DeepSpeed "
                         "config"),
    "micro_batches": ("the micro-batches per step", "set gradient_accumulation_steps to {saved} in the DeepSpeed "
                      "config"),
    "seq_len": ("the sequence length", "--seq_len {saved}"),
    "seed": ("the seed", "--seed {saved}"),
}


def _sequences_per_micro_batch(meta: dict) -> int:
    """Sequences in one micro-batch over all replicas: what a step's samples depend on (data/sampler.py)."""
    return meta.get("data_parallel", 1) * meta.get("micro_batch_size", 0)


def check_compatible(saved: dict, current: dict, run_dir: Path, sharded_optimizer: bool = False) -> None:
    """Refuse to resume into a launch that would load shards of a different shape, or continue
    another experiment, naming the flag that gives the run's own value.

    Another number of data-parallel replicas resumes when the global batch is unchanged (replicas
    x micro-batch size, and the micro-batches per step): the sampler then gives each step the same
    sequences in the same order, and the optimizer state, whole in every replica's checkpoint
    without ZeRO (`sharded_optimizer` False), loads into any replica count. ZeRO-1's state is
    sharded per replica; resharding it is not built, so that change is refused."""
    regrouped = (saved.get("data_parallel") != current.get("data_parallel")
                 and _sequences_per_micro_batch(saved) == _sequences_per_micro_batch(current)
                 and saved.get("micro_batches") == current.get("micro_batches"))
    if regrouped and sharded_optimizer:
        raise UserError(f"cannot resume {run_dir} on {current.get('data_parallel')} replica(s) per stage: its "
                        f"optimizer state is sharded by ZeRO over {saved.get('data_parallel')} replicas, and "
                        f"resharding it is not built.",
                        f"launch {saved.get('data_parallel')} replica(s) per stage to continue the run, or start a "
                        f"new --out with --init_from {run_dir} (weights only, a fresh optimizer).")
    for key, (what, given_by) in _GIVEN_BY.items():
        if regrouped and key in ("data_parallel", "micro_batch_size"):
            continue
        if saved.get(key) != current.get(key):
            if key.endswith("sha256"):
                differs = f"{what} differs from the run's"
            else:
                differs = f"{what} differs: the run has {saved.get(key)!r}, this launch {current.get(key)!r}"
            fix = given_by.format(saved=saved.get(key), short=str(saved.get(key))[:12])
            raise UserError(f"cannot resume {run_dir}: {differs}.",
                            f"{fix} to continue the run, or start a new --out for the new setting (with "
                            f"--init_from {run_dir} to start from its weights).")
    if bool(saved.get("emulated")) != bool(current.get("emulated")):
        raise UserError(f"the checkpoint in {run_dir} was written by "
                        f"{'the one-process emulator' if saved.get('emulated') else 'a launched pipeline'}, "
                        f"and its optimizer state is laid out for that.",
                        f"resume {'with' if saved.get('emulated') else 'without'} --emulate, or start a new --out.")


def check_schedule_length(saved: dict, current: dict, ds_config: dict, run_dir: Path) -> None:
    """The rule for a changed --steps on resume. A learning-rate schedule that knows the run's
    length (DeepSpeed's total_num_steps: WarmupCosineLR, WarmupDecayLR) would silently stretch
    or squeeze from the resumed step on, so a changed length is refused. A schedule without one
    (WarmupLR, constant) does not depend on it: the run may be extended or cut."""
    scheduler = ds_config.get("scheduler", {})
    old, new = saved.get("steps"), current.get("steps")
    if old is None or old == new or "total_num_steps" not in scheduler.get("params", {}):
        return
    raise UserError(
        f"the run in {run_dir} was started for {old} steps and its {scheduler.get('type', 'learning-rate')} "
        f"schedule decays over them; this launch asks for {new}, which would re-stretch the schedule from the "
        f"resumed step on.",
        f"pass --steps {old} to continue the run as planned; to train for {new} steps on a fresh schedule, "
        f"start a new --out with --init_from {run_dir} (weights only).")


def load(engine, run_dir: Path, tag: str) -> None:
    ckpt_dir = names.checkpoints(run_dir)
    fix = f"delete {ckpt_dir / tag}, point {ckpt_dir / LATEST} at an earlier step_* folder, or start a new --out."
    try:
        with configured_hyperparameters_win(optimizers_and_schedulers(engine)):
            path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    except Exception as err:  # torch.load / state_dict errors: the files are damaged or foreign
        raise UserError(f"checkpoint {ckpt_dir / tag} could not be loaded ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200]}).", fix) from None
    if path is None:  # DeepSpeed warns and returns None when files are missing
        raise UserError(f"checkpoint {ckpt_dir / tag} is missing DeepSpeed state files.", fix)
    if engine.extra_state() is not None:
        extra = ckpt_dir / tag / names.block_local_state(engine.stage_id)
        try:
            engine.load_extra_state(torch.load(extra, map_location="cpu", weights_only=False))
        except Exception as err:
            raise UserError(f"block-local state {extra} could not be loaded ({type(err).__name__}).", fix) from None


def remove_incomplete(run_dir: Path) -> list[str]:
    """Folders from saves that were killed before completion; they are never loaded."""
    removed = []
    for p in sorted(names.checkpoints(run_dir).glob("step_*")):
        if not (p / MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> tuple[Path, dict]:
    """The checkpoint folder (latest complete one, or the given step) and its complete.json: what
    evaluate/export/generate (bll_ds/use/trained_run.py) and --init_from (bll_ds/run/init_weights.py) read."""
    if not (run_dir / names.MODEL_CONFIG).is_file():
        raise UserError(f"{run_dir} is not a bll-ds run dir (no {names.MODEL_CONFIG}).",
                        "pass the --out folder of a pretrain.py run (runs started before model_config.json "
                        "existed need a re-run or a copy of the resolved model config there).")
    if step is None:
        latest = latest_complete(run_dir)
        if latest is None:
            raise UserError(f"{run_dir} holds no complete checkpoint.",
                            "train until the first checkpoint (--save_interval, or the end of the run).")
        tag, meta = latest
    else:
        tag = tag_for(step)
        marker = names.checkpoints(run_dir) / tag / MARKER
        if not marker.is_file():
            raise UserError(f"{run_dir} has no complete checkpoint for step {step}.",
                            "omit --step for the latest one, or pick a step listed under checkpoints/.")
        meta = json.loads(marker.read_text())
    return names.checkpoints(run_dir) / tag, meta


def holds_sharded_optimizer(run_dir: Path, tag: str) -> bool:
    """Whether the checkpoint's optimizer state is ZeRO-sharded per replica (zero_pp_rank_* files)."""
    return any((names.checkpoints(run_dir) / tag).glob("zero_pp_rank_*"))
