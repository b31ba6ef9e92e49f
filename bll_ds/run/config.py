"""One config object per run: `RunConfig`, with documented defaults, filled from the command line.

Everything about *how DeepSpeed trains* (batch sizes, optimizer, scheduler, precision, ZeRO,
clipping) lives in the DeepSpeed JSON given with --deepspeed_config, unchanged from what a
DeepSpeed user writes. Everything about *what* is trained (model, data, tokenizer, method,
stages, steps, output) lives here.

A run can also be given as a file: `--config FILE` (JSON or YAML, the shape of a run dir's
run_config.json; bll_ds/run/config_file.py). Flags given beside it override it.

RunConfig groups its fields in sections (`cfg.bll`, `cfg.eval`, `cfg.checkpoint`,
`cfg.nonfinite`, `cfg.metrics`), each a dataclass whose parts take them whole. The command line
stays flat: a section field's flag is its section's prefix plus its name (`--bll_variant` fills
`cfg.bll.variant`) unless the field names its own flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.run.config_file import unknown_field, with_config
from bll_ds.infra.errors import UserError
from bll_ds.method.default_variant import DEFAULT_VARIANT

METHODS = ("bp", "bll")
ON_NONFINITE = ("stop", "skip")
RESUME = ("no", "yes", "auto")


def _doc(text: str, flag: str | None = None, low: float | None = None, **kwargs):
    """A documented field. `flag`: its own flag name; `low`: the least value a number may take
    (checked by parse_run_config before anything is built or written; None stays allowed where it
    is the default)."""
    metadata = {"help": text}
    if flag is not None:
        metadata["flag"] = flag
    if low is not None:
        metadata["low"] = low
    return field(metadata=metadata, **kwargs)


@dataclass
class BLLConfig:
    """--method bll: the local loss and how the block-local pipeline runs (flags --bll_*)."""
    variant: str = _doc("Local loss (docs/METHOD.md). The default, critic-context:dim=128:neg=2048:labels=0.9:extrap=2: "
                        "the next stage trains a critic of this stage's output toward its own prediction mixed with "
                        "the labels (share 0.9) and sends it upstream as the local readout, read extrapolated "
                        "over its two-step lag, plus two heads that reconstruct the two preceding tokens "
                        "(bll_ds/method/default_variant.py). Others: dgl-context (free local heads, nothing sent "
                        "upstream), prototype (the feedback network's target prototypes), gaussian, bernoulli, dgl, "
                        "drtp, direct, the -aux, -overlap and -man levers, or a variant of your own "
                        "(--custom_import). Options follow the name: NAME:dim=r:neg=n:table=bf16:refresh=k, a "
                        "readout in r dimensions, a softmax over the micro-batch's targets and n sampled negatives, "
                        "the message in bf16 and sent every k steps; critic*:labels=a, the labels' share of the "
                        "critic's target; gaussian/bernoulli:guard=w; -man:mu=m:affine=0|1 "
                        "(bll_ds/method/variant_options.py).",
                        default=DEFAULT_VARIANT)
    steps_per_call: int = _doc("Optimizer steps per engine call, BLL only: the pipe fills and drains once per "
                               "call, not once per step; 1 = drain after every step. Backprop drains after "
                               "every step by construction (1F1B's flush) and runs one step per call.",
                               default=32, low=1)
    readout_max_logits_mb: float = _doc("The per-token local readouts (prototype, dgl, drtp) run in sequence "
                                        "slices whose fp32 logits stay under this many MiB, so a large "
                                        "vocabulary does not add a [tokens, V] stash per stage (0 = one slice).",
                                        default=16.0, low=0)


@dataclass
class EvalConfig:
    """Held-out evaluation of the full forward network."""
    interval: int = _doc("Steps between held-out evaluations (0 = only at the end).", default=250, low=0)
    batches: int = _doc("Micro-batches per data-parallel replica in a periodic evaluation.", default=20, low=1)
    final_batches: int = _doc("Micro-batches per replica in the final evaluation (0 = the whole held-out split).",
                              flag="final_eval_batches", default=0, low=0)


@dataclass
class CheckpointConfig:
    """Atomic checkpoints in RUN_DIR/checkpoints/ (bll_ds/run/checkpoint.py)."""
    save_interval: int = _doc("Steps between checkpoints (0 = only at the end).", flag="save_interval",
                              default=500, low=0)
    keep: int = _doc("Complete checkpoints kept on disk (older ones are deleted; 0 = keep every one).",
                     flag="keep_checkpoints", default=2, low=0)
    exit_interval: int = _doc("Save a checkpoint and exit cleanly once the step count is a multiple of this "
                              "(0 = never): run long jobs in slices under a scheduler's time limit.",
                              flag="exit_interval", default=0, low=0)
    resume: str = _doc("'yes' (the bare flag --resume): continue the run in --out from its latest complete "
                       "checkpoint, and fail if it has none. 'auto': continue it if it has one, else start it "
                       "(what a requeued scheduler job wants). 'no': start a new run, and fail if --out "
                       "already holds checkpoints.", flag="resume", default="no")
    exit_duration_mins: float = _doc("Save a checkpoint and exit cleanly at the first step boundary after this "
                                     "many minutes of wall time since start-up (0 = never): set it a few "
                                     "minutes under the job's time limit. SIGTERM and SIGUSR1 do the same at "
                                     "once (the next step boundary).", flag="exit_duration_mins", default=0.0, low=0)


@dataclass
class NonFiniteConfig:
    """Steps whose loss or gradients are NaN/inf (bll_ds/pipeline/nonfinite.py, nonfinite_policy.py)."""
    policy: str = _doc("A step whose loss or gradients are NaN/inf is never applied. 'stop': the run stops, "
                       "naming the step, the stage and the last good checkpoint. 'skip': the update is "
                       "dropped and training goes on (the learning-rate schedule advances); block-local "
                       "stages decide alone, backprop stages together.", flag="on_nonfinite", default="stop")
    max_consecutive_skips: int = _doc("With --on_nonfinite skip: a stage that skips more steps than this in a "
                                      "row has diverged, and the run stops.", flag="max_consecutive_skips",
                                      default=10, low=0)


@dataclass
class MetricsConfig:
    """What the run measures and logs (bll_ds/metrics/)."""
    log_interval: int = _doc("Steps between metrics.jsonl / TensorBoard lines.", flag="log_interval", default=10, low=1)
    throughput_warmup_steps: int = _doc("Steps excluded from the tokens/s median.", flag="throughput_warmup_steps",
                                        default=5, low=0)
    trace_steps: int = _doc("The last N warm-up steps are traced: every pipeline instruction timed into "
                            "timeline_stage{k}.json, and the saved-activation peak metered (0 = off).",
                            flag="trace_steps", default=3, low=0)
    measure_matmul_peak: bool = _doc("Measure the device's fp32/bf16 matrix-product peak, for model FLOP "
                                     "utilisation in summary.json (under a second each: before and after the final "
                                     "evaluation, the best kept; none at start-up).", flag="measure_matmul_peak", default=True)
    progress: bool = _doc("Show a progress bar (the last stage's first rank) that moves every optimizer step, with "
                          "the loss, tokens/s and the time left.", flag="progress", default=True)


def resolve_seq_len(cfg: "RunConfig", model_config) -> int:
    """--seq_len, or the model's context length; it must fit the context."""
    context = model_config.max_position_embeddings
    seq_len = cfg.seq_len or context
    if not 1 <= seq_len <= context:
        raise UserError(f"--seq_len {seq_len} does not fit the model's context of {context} positions.",
                        f"pass --seq_len between 1 and {context}, or raise the spec's context length.")
    return seq_len


@dataclass
class RunConfig:
    model: str = _doc("Model spec: a Hugging Face config.json of the gpt2 or llama family (models/*.json).")
    deepspeed_config: str = _doc("DeepSpeed JSON config (ds_configs/*.json).")
    out: str = _doc("Run directory: checkpoints, tokenizer, metrics.jsonl, summary.json, tb/.")
    method: str = _doc("'bll' = block-local learning (each stage trains on its own local loss); "
                       "'bp' = DeepSpeed's own pipeline backprop (1F1B), the baseline.", default="bll")
    stages: int = _doc("Pipeline stages S. The launch needs N = S x data-parallel replicas ranks.", default=2, low=1)
    emulate: bool = _doc("Train the S-stage pipeline in this one process, on one device (CUDA when present, "
                         "else every CPU core), with the launched run's semantics (bll_ds/pipeline/emulated/emulator.py): "
                         "run with python, not a launcher. For depth sweeps at 8-16+ stages.", default=False)
    data: str | None = _doc("Text/jsonl/parquet file, folder, glob, HF dataset name[:config], or tokens:DIR "
                            "(token shards written once by python -m bll_ds.data.prepare_tokens). "
                            "Default: the Python standard library sources of this interpreter.", default=None)
    tokenizer: str = _doc("'char', 'bpe:N', 'unigram:N' (trained on the training split, saved in the run "
                          "dir), a path to a sentencepiece .model file, a Hugging Face tokenizer.json or a "
                          "local tokenizer folder (loaded offline).", default="bpe:4096")
    text_field: str = _doc("The field (jsonl), column (parquet) or feature (Hugging Face dataset) that holds "
                           "each document's text.", default="text")
    steps: int | None = _doc("Optimizer steps. Default: the scheduler's total_num_steps in the DeepSpeed "
                             "config, else 1000. It also sets the scheduler's total_num_steps.", default=None, low=1)
    seq_len: int | None = _doc("Tokens per training sequence. Default: the model's context length.", default=None, low=1)
    seed: int = _doc("Seed for weights and data order.", default=1234, low=0)
    cache_dir: str = _doc("Cache of tokenized corpora (flat token memmaps).",
                          default=str(Path.home() / ".cache" / "bll_ds"))
    tokenize_workers: int = _doc("Processes for datasets.map tokenization.", default=2, low=1)
    init_from: str | None = _doc("Start from existing weights (weights only: a new optimizer and schedule): a "
                                 "Hugging Face model folder (config.json + safetensors/bin) of the same shape, "
                                 "or another bll-ds run dir (its latest complete checkpoint).", default=None)
    activation_checkpoint_interval: int = _doc("Recompute activations in backward every this many layers "
                                               "(DeepSpeed's PipelineModule activation_checkpoint_interval; "
                                               "0 = off, 1 = every decoder layer), for both methods.",
                                               default=0, low=0)
    link_delay_ms: float = _doc("Benchmarks: every point-to-point message between stages arrives this many "
                                "milliseconds after it is sent (one way), without blocking the sender "
                                "(bll_ds/pipeline/launched/link_delay.py). 0 = off.", default=0.0, low=0)
    custom_import: str | None = _doc("A .py file or module imported before the flags are parsed, e.g. one that "
                                     "registers a BLL variant of your own (bll_ds/method/variants.py).", default=None)
    ds_set: list[str] = _doc("Set a value of the DeepSpeed config: KEY.PATH=VALUE, the value read as JSON (else as "
                             "a string), repeatable: --ds_set optimizer.params.lr=3e-4 --ds_set bf16.enabled=true. "
                             "Applied over --deepspeed_config; the run dir's ds_config.json records the result.",
                             default_factory=list)
    bll: BLLConfig = field(default_factory=BLLConfig, metadata={"prefix": "bll_"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"prefix": "eval_"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"prefix": ""})
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig, metadata={"prefix": ""})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"prefix": ""})


def _is_section(f: dataclasses.Field) -> bool:
    return "prefix" in f.metadata


def _flag_fields():
    """(section name or None, field, flag name) of every field that is a command-line flag."""
    for f in dataclasses.fields(RunConfig):
        if _is_section(f):
            for sub in dataclasses.fields(f.default_factory):
                yield f.name, sub, sub.metadata.get("flag", f.metadata["prefix"] + sub.name)
        else:
            yield None, f, f.name


def build_parser() -> argparse.ArgumentParser:
    from bll_ds.method import variants  # late: the registry imports the feedback blocks (torch)

    parser = argparse.ArgumentParser(
        prog="pretrain.py", formatter_class=DefaultsHelpFormatter,
        description="Pretrain a causal LM on a DeepSpeed pipeline. Launch with: "
                    "deepspeed --num_gpus N scripts/pretrain.py --model ... --deepspeed_config ... --out DIR")
    choices = {"method": METHODS, "on_nonfinite": ON_NONFINITE, "resume": RESUME}
    types = {"bll_variant": variants.argparse_type}  # a name, optionally with options (variant_options.py)
    parser.add_argument("--config", help="A run described by a file: JSON or YAML in the shape of a run dir's "
                        "run_config.json (recipes/*.yaml), or a run dir. Flags given beside it override it: "
                        "--config RUN_DIR --out NEW reproduces a run.")
    for _, f, flag in _flag_fields():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        # One definition per flag: --seq-len is the same argument as --seq_len, with its type and choices.
        names = ["--" + flag] + (["--" + flag.replace("_", "-")] if "_" in flag else [])
        if f.type == "bool":
            parser.add_argument(*names, dest=flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
            continue
        if f.type == "list[str]":
            parser.add_argument(*names, dest=flag, action="append", default=None, help=f.metadata["help"])
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(f.type, str)
        if flag == "resume":  # `--resume` alone means "yes", as before; `--resume auto` for schedulers
            parser.add_argument("--resume", nargs="?", const="yes", default=f.default, choices=RESUME,
                                help=f.metadata["help"])
            continue
        parser.add_argument(*names, dest=flag, type=types.get(flag, kind), required=required,
                            default=None if required else f.default, help=f.metadata["help"], choices=choices.get(flag))
    # Added by the deepspeed launcher; the rank comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    return parser


def _import_custom(argv: list[str] | None) -> None:
    """--custom_import first, so that what it registers is among the parser's choices."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--custom_import", "--custom-import", default=None)
    spec = pre.parse_known_args(argv)[0].custom_import
    if spec:
        from bll_ds.method import variants

        try:
            variants.import_custom(spec)
        except (FileNotFoundError, ModuleNotFoundError) as err:
            raise UserError(f"--custom_import {spec}: {err}.",
                            "pass a .py file that exists or an importable module name.") from None


# Flags that became variant options: one channel for every option of a variant, its spec.
_MOVED_FLAGS = {"--bll_guard_weight": "--bll_variant gaussian:guard=0.5 (or bernoulli:guard=0.5)",
                "--bll_learn_variance": "--bll_variant gaussian:variance=learned"}


def _flatten_config_file(file: Path, data: dict, given: set[str]) -> dict:
    """A file in run_config.json's shape -> {flag name: value}. A file's `resume` belongs to the
    run dir the file names: with another --out, `--config OLD_RUN --out NEW` reproduces the run in
    NEW from step 0 unless --resume is given too."""
    flags = {(section, f.name): flag for section, f, flag in _flag_fields()}
    sections = {section for section, _ in flags if section is not None}
    flat = {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                raise UserError(f"--config {file}: `{key}` is a section and takes a mapping of its fields, "
                                f"not {value!r}.", f"write `{key}:` with its fields below it, as in a run dir's "
                                f"run_config.json.")
            items = [(key, name, v) for name, v in value.items()]
        else:
            items = [(None, key, value)]
        for section, name, v in items:
            if (section, name) not in flags:
                known = {n for s, n in flags if s == section} | (sections if section is None else set())
                raise unknown_field(file, name, known, f" in section `{section}`" if section else " in the top level")
            if flags[(section, name)] == "resume" and "out" in data and "--out" in given:
                continue
            flat[flags[(section, name)]] = v
    return flat


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    argv = list(argv if argv is not None else sys.argv[1:])
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in _MOVED_FLAGS:
            raise UserError(f"{flag} is no longer a flag: variant options are written after the variant's name.",
                            f"use {_MOVED_FLAGS[flag]}.")
    parser = build_parser()
    argv = with_config(parser, argv, _flatten_config_file)  # the file's flags first: the command line overrides
    _import_custom(argv)
    args = vars(parser.parse_args(argv))
    args["ds_set"] = args["ds_set"] or []
    top, sections = {}, {f.name: {} for f in dataclasses.fields(RunConfig) if _is_section(f)}
    for section, f, flag in _flag_fields():
        value, low = args[flag], f.metadata.get("low")
        (top if section is None else sections[section])[f.name] = value
        if low is not None and value is not None and value < low:
            default = "" if f.default is None else f" (the default is {f.default})"
            given = f"{value:g}" if isinstance(value, float) else value
            raise UserError(f"--{flag} {given} is out of range: it must be at least {low:g}.",
                            f"pass --{flag} {low:g} or more, or leave the flag out{default}.")
    section_types = {f.name: f.default_factory for f in dataclasses.fields(RunConfig) if _is_section(f)}
    return RunConfig(**top, **{name: section_types[name](**values) for name, values in sections.items()})
