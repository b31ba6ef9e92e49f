"""Every name inside a run directory (--out), defined once.

    RUN_DIR/
        model_config.json              the resolved model (the tokenizer sets the vocabulary)
        run_config.json                this launch's resolved RunConfig (every flag, defaults filled in)
        ds_config.json                 the DeepSpeed config as DeepSpeed got it (batch sizes, steps,
                                       bf16 "auto" resolved, with its measurement)
        tokenizer.model                the run's sentencepiece tokenizer (reused on resume), or
        hf_tokenizer/                  its Hugging Face tokenizer (tokenizer.json, tokenizer_config.json)
        tokenizer.json                 bll-ds's record of the tokenizer (spec, sha256), not an HF file
        writer.lock                    who writes the run now (host, pid, start); gone when it ends
        summary.json                   written once, at the end
        metrics.jsonl, tb/             the run log (last stage)
        metrics_stage{k}.jsonl, tb/stage{k}/   one stage log per stage
        timeline_stage{k}.json         traced pipeline instructions of stage k
        checkpoints/latest             names the newest complete checkpoint
        checkpoints/step_NNNNNNN/      DeepSpeed's files (layer_NN-model_states.pt, ...),
                                       complete.json, bll_stage{kk}.pt
"""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "run_config.json"
DS_CONFIG = "ds_config.json"
TOKENIZER_MODEL = "tokenizer.model"
HF_TOKENIZER = "hf_tokenizer"       # a folder (bll_ds/data/hf_tokenizer.py)
TOKENIZER_META = "tokenizer.json"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
LATEST = "latest"                  # inside CHECKPOINTS
COMPLETE_MARKER = "complete.json"  # inside a checkpoint folder, written last
TIMELINE_PREFIX = "timeline_stage"
WRITER_LOCK = "writer.lock"        # bll_ds/run/run_lock.py


def checkpoints(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_tag(step: int) -> str:
    return f"step_{step:07d}"


def block_local_state(stage: int) -> str:
    """A stage's block-local state inside a checkpoint folder (feedback weights, table queue)."""
    return f"bll_stage{stage:02d}.pt"


def layer_weights(index: int) -> str:
    """DeepSpeed's file for pipeline layer `index` (its position in the pipeline) in a checkpoint folder."""
    return f"layer_{index:02d}-model_states.pt"


def stage_metrics(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"metrics_stage{stage}.jsonl"


def stage_tensorboard(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / TENSORBOARD / f"stage{stage}"


def timeline(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"{TIMELINE_PREFIX}{stage}.json"


def timelines(run_dir: Path) -> list[Path]:
    """Every stage's timeline file, stage 0 first."""
    paths = Path(run_dir).glob(f"{TIMELINE_PREFIX}*.json")
    return sorted(paths, key=lambda p: int(p.stem.removeprefix(TIMELINE_PREFIX)))
