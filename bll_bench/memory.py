"""Per-stage memory planner: what one pipeline stage holds, in bytes, for BP (DeepSpeed 1F1B)
and block-local learning (BLL), and which GPU clusters fit 1B, 7B and 13B models.

    python -m bll_bench.memory --model models/llama-7b.json --stages 8 --dp 1 \
        --micro_batch_size 1 --seq_len 2048 --micro_batches 32 --dtype bf16 --zero 1 --method bll
    python -m bll_bench.memory clusters --out DIR     # clusters.md / clusters.json
    python -m bll_bench.memory clusters --out DIR --activation_checkpoint_interval 1
    python -m bll_bench.memory rss-check              # against docs/results/quality.md's llama-25m RSS

Every term is what the code of this project and of DeepSpeed 0.19.8 / transformers 5.23 holds
(file references next to each term). n = micro_batch_size x seq_len tokens, e = bytes of the
model dtype (fp32 4, bf16 2), P = this stage's trainable parameters.

Weights, gradients, optimizer (DeepSpeed picks the optimizer wrapper from dtype and ZeRO stage,
deepspeed/runtime/engine.py `_do_optimizer_sanity_check`):

    fp32, ZeRO-0   torch AdamW            4P weights + 4P grads + 8P (exp_avg, exp_avg_sq)
    fp32, ZeRO-1   DeepSpeedZeroOptimizer 4P weights + 4P grads + (4P master copy + 8P) / DP
    bf16, ZeRO-1   BF16_Optimizer         2P weights + 2P bf16 grads (param.grad, kept: no
                   (grad_accum fp32)      immediate_grad_update) + 4P fp32 grad-accumulation buffer
                                          (not partitioned) + (4P fp32 master + 8P) / DP
    bf16, ZeRO-0   BF16_Optimizer         as above with a bf16 accumulation buffer (2P); DeepSpeed
                   (grad_accum bf16)      refuses bf16 + ZeRO-0 + fp32 accumulation

Activations (autograd's saved tensors; formula per token in `decoder_layer_saved_bytes`, checked
against `measure_saved_activation_bytes` by tests/test_memory.py):
- BP, stage k of S: min(S - k, M) micro-batches in flight at the 1F1B peak (deepspeed
  TrainSchedule.num_pipe_buffers), each with its layers' saved tensors, the received input (the
  forward runs on a clone, the original waits for its gradient) and the output (logits on the
  last stage) held in pipe_buffers until its backward.
- BLL: one micro-batch (forward, then the local backward, before the next), plus its local
  readout, plus the engine's send window, plus the target tables. The readout (norm, logits,
  fp32 log-probabilities, int64 targets) of the prototype, dgl and drtp variants runs in
  `slices_for(variant, [b, T], V, readout_max_logits_mb)` sequence slices
  (bll_ds/method/stage_step.py `sliced_local_backward`, which StageStep uses when there are
  several): one slice's readout is alive at a time (a slice of the block output is a view of it,
  so where the readout norm saves its input, and for b = 1 the targets, the whole micro-batch's
  storage is saved), then the block's backward runs once from the accumulated gradient of the
  block output, which its surrogate product saves ([n, hidden]). `readout_max_logits_mb`
  defaults to 16 as RunConfig's --bll_readout_max_logits_mb; 0 means one slice. Tables
  (feedback_channel.py, feedback.py): the inbox queue (up to LAG + 1 tables right after a drain),
  m_k = g_k(m_{k+1}), computed once per step without a graph, and its accumulated gradient (each
  micro-batch's readout saves m_k, the product's right operand), and up to two published
  payloads awaiting completion in the outbox. g_k's own activations are not held through the
  step: finish_step recomputes g_k's forward (saving the received table, up's and gelu's
  [V, hidden] outputs) and its surrogate product saves m_k's gradient, at the step's end.
  The critic variants (bll_ds/method/critic.py) have no g_k: the readout reads the received
  critic as data (its products save views of the message), and every stage but the first also
  trains a critic of its input in the same backward as its loss (the last stage beside the LM
  loss), whose norm, fp32 log-probabilities and fp32 target [tokens, C] are alive with the
  readout's; the last stage then holds a block too. The -man variants (a copied decoder layer in
  the readout) are not modelled.
  Send window: the planner counts the worst case, 2M detached outputs referenced by isends
  (BLLPipelineEngine.max_inflight_sends), which a slow receiver reaches. The engine releases
  completed sends at the next send, so with a prompt receiver it typically holds one or two; a
  "does it fit" answer has to count the worst case.
- Activation checkpointing (--activation_checkpoint_interval c, both methods;
  bll_ds/modeling/checkpointing.py): a checkpointed group of decoder layers keeps only its input
  ([n, hidden]) per micro-batch in flight, and during that micro-batch's backward one group's
  recomputed saved tensors are alive on top of what of its stash is left (`_body_phases`). BP's
  engine meter does not see that recompute (its BackwardPass is not metered), BLL's does.

Transients on top (estimates, not measured): the backward of one layer (bounded by that layer's
saved bytes) or of the loss (two fp32 [tokens, V] gradients, per slice where the readout is
sliced, plus the block output's accumulated gradient); BLL's `table_drift` diagnostic, computed
once per step during the first micro-batch's readout (fp32 copies of two [V, H] tables); at the
step boundary (activations freed): the flat fp32 copy of the gradients made by the gradient
reduction, the optimizer's foreach scratch, or finish_step's recompute of g_k and its backward.
The peak is the larger of "during a micro-batch" and "at the step boundary".

Not modelled: CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation (the cluster
search takes them as one fixed `runtime_overhead`), dropout masks (every spec here has dropout 0),
and DeepSpeed's fp32 ZeRO-1 reduce bucket on GPUs (`reduce_bucket_size` 5e8 elements = 1.9 GiB,
allocated at the step boundary; on CPUs only its touched pages count, which the 4P reduce copy
covers).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PretrainedConfig

from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.measure.flops import _attention_width, _mlp_width
from bll_ds.method import variants
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.method.feedback import TableFeedback
from bll_ds.method.stage_step import slices_for
from bll_ds.modeling import load_model_spec
from bll_ds.modeling.checkpointing import checkpointed_groups
from bll_ds.modeling.pipeline import layer_specs, stage_layer_counts
from bll_ds.pipeline.feedback_channel import LAG, OUTBOX_HELD
from bll_ds.pipeline.launched.bll_engine import SEND_WINDOW_PER_MICRO_BATCH
from bll_ds.pipeline.trace import SavedActivationMeter
from bll_ds.run.config import BLLConfig

FP32 = 4
INT64 = 8
LOSS_TOTAL_WEIGHT = FP32  # cross-entropy's nll_loss saves total_weight, a 0-dim fp32 tensor, once per loss
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
METHODS = ("bp", "bll")
GIB = 2 ** 30
MIB = 2 ** 20

# BLL engine holdings, from their owners (bll_ds/pipeline/launched/bll_engine.py, feedback_channel.py).
INBOX_TABLES = LAG + 1      # TableInbox.queue right after a drain: P_{t-2}, P_{t-1}, P_t
OUTBOX_TABLES = OUTBOX_HELD
READOUT_MAX_LOGITS_MB = BLLConfig().readout_max_logits_mb  # --bll_readout_max_logits_mb's default

LM_HEAD = "lm_head"  # the last stage's readout: the LM head with lm_loss

# GPT-2 MLP: storages of width I saved per token by c_fc's activation and c_proj.
# gelu_new is a Python expression: its input, tanh(.), 0.5*x, 1 + tanh(.), and the product.
GPT2_MLP_SAVED = {"gelu_new": 5, "gelu": 2, "gelu_pytorch_tanh": 2}


# ---------------------------------------------------------------------------------------------
# Saved activations per token (autograd's saved tensors; parameters excluded)
# ---------------------------------------------------------------------------------------------

def norm_saved_bytes(config: PretrainedConfig, e: int, input_requires_grad: bool = True) -> int:
    """Per token: a pre-norm's saved tensors plus its output (which the next linear saves).

    Llama RMSNorm (HF): the fp32 input (the input itself in fp32, a copy in bf16) and rsqrt [1]
    (only when a gradient flows to the input), x*rsqrt cast to the model dtype (for the gain's
    gradient), and weight * that. GPT-2 LayerNorm: its input, mean and rstd (fp32 on GPUs; CPU
    keeps the input dtype, 4 bytes a token smaller), and its output, whether or not the input
    needs a gradient.
    """
    width = config.hidden_size
    if config.model_type == "gpt2":
        return e * width + 2 * FP32 + e * width
    return (FP32 * width + FP32 if input_requires_grad else 0) + 2 * e * width


def norm_saves_its_input(config: PretrainedConfig, e: int, input_requires_grad: bool = True) -> bool:
    """Whether the norm saves its input tensor itself (not a fp32 copy of it, and not nothing)."""
    return config.model_type == "gpt2" or (e == FP32 and input_requires_grad)


def decoder_layer_saved_bytes(config: PretrainedConfig, e: int) -> int:
    """Per token, one decoder block with SDPA attention (rotary tables excluded, see
    `rope_table_bytes`). Measured on CPU (tests/test_memory.py); the GPU flash/efficient kernels
    save the same set (q, k, v, output, fp32 logsumexp).

    Llama: 2 norms + q, k, v as SDPA gets them (k, v at kv-heads width: transformers passes
    enable_gqa=True when there is no mask) + SDPA output (o_proj saves the same storage: the
    kernel writes [b, T, heads, d], so transpose(1, 2).contiguous() is a view) + logsumexp
    (fp32, one per head) + SwiGLU: gate, up, silu(gate), product (4 x I).
    GPT-2: 2 norms + c_attn output (q, k, v are views of it, 3H) + SDPA output + logsumexp +
    the MLP's activation storages (GPT2_MLP_SAVED).
    """
    query_width, kv_width = _attention_width(config)
    heads = config.num_attention_heads
    attention = e * (query_width + 2 * kv_width) + e * query_width + FP32 * heads
    if config.model_type == "gpt2":
        activation = config.activation_function
        if activation not in GPT2_MLP_SAVED:
            raise ValueError(f"no saved-tensor count for GPT-2 activation {activation!r}; "
                             f"known: {sorted(GPT2_MLP_SAVED)}")
        mlp = GPT2_MLP_SAVED[activation] * e * _mlp_width(config)
    else:
        mlp = 4 * e * _mlp_width(config)
    return 2 * norm_saved_bytes(config, e) + attention + mlp


def rope_table_bytes(config: PretrainedConfig, seq_len: int, e: int) -> int:
    """Rotary cos and sin, [T, head_dim] each, cached once per Llama layer (modeling/layers.py
    _RotaryTable) and saved by every forward: shared across micro-batches."""
    if config.model_type == "gpt2":
        return 0
    head_dim = _attention_width(config)[0] // config.num_attention_heads
    return 2 * seq_len * head_dim * e


def readout_saved_bytes(config: PretrainedConfig, e: int, readout: str = LM_HEAD,
                        micro_batch_tokens: int | None = None) -> int:
    """Per token, the readout's saved tensors in one slice: a norm, a [V]-way product and fp32
    cross-entropy (log-probabilities [V] fp32 and the int64 target) for the LM head with lm_loss;
    a BLL variant's own count (feedback.py `readout_saved_bytes_per_token`) otherwise. The table
    or weight the product reads is not an activation."""
    norm = norm_saved_bytes(config, e)
    if readout == LM_HEAD:
        return norm + FP32 * config.vocab_size + INT64
    per_token = variants.get(readout).readout_saved_bytes_per_token(config, e, norm, micro_batch_tokens)
    if per_token is None:
        raise ValueError(f"activations of the {readout!r} readout are not modelled; plan one of {modelled_variants()}")
    return per_token


def is_modelled(variant: str) -> bool:
    """Whether the planner models `variant`'s readout activations (a spec with options included)."""
    probe = SimpleNamespace(vocab_size=1, hidden_size=1, max_position_embeddings=1)
    return variants.get(variant).readout_saved_bytes_per_token(probe, FP32, 0) is not None


def modelled_variants() -> tuple[str, ...]:
    """BLL variants whose readout activations the planner models (those that declare them)."""
    return tuple(name for name in variants.names() if is_modelled(name))


def modelled_spec(spec: str) -> str:
    """`type=` of --variant: a registered variant (options included) whose readout is modelled."""
    variants.argparse_type(spec)
    if not is_modelled(spec):
        raise argparse.ArgumentTypeError(f"activations of the {spec!r} readout are not modelled; plan one of "
                                         f"{modelled_variants()}")
    return spec


def readout_slices(variant: str, micro_batch_size: int, seq_len: int, vocab_size: int,
                   max_logits_mb: float = READOUT_MAX_LOGITS_MB) -> int:
    """Sequence slices of BLL's local readout, as the engine picks them (stage_step.slices_for)."""
    return slices_for(variants.get(variant), (micro_batch_size, seq_len), vocab_size, max_logits_mb)


def sliced_readout_saved_bytes(config: PretrainedConfig, e: int, micro_batch_size: int, seq_len: int,
                               slices: int, variant: str = "prototype") -> int:
    """Peak saved bytes of one micro-batch's local readout run in `slices` sequence slices
    (stage_step.sliced_local_backward: each slice's backward runs before the next slice).

    The largest slice has b x ceil(T / slices) tokens (tensor_split). A slice of the block output
    is a view of it: where the norm saves its input itself (`norm_saves_its_input`), the saved
    storage is the whole [b, T, H] output. The targets likewise: labels[:, part] is a view, which
    cross-entropy's reshape(-1) copies when b > 1; for b = 1 it stays a view of all T labels.
    With one slice this is b x T x `readout_saved_bytes`. Plus the loss's total_weight scalar.
    Also the last stage's LM head with lm_loss (one slice)."""
    n = micro_batch_size * seq_len
    per_token = readout_saved_bytes(config, e, variant, n)
    if slices == 1:
        constant = 0 if variant == LM_HEAD else variants.get(variant).readout_saved_bytes_per_micro_batch(config, e, n)
        return n * per_token + LOSS_TOTAL_WEIGHT + constant
    whole = 0
    if norm_saves_its_input(config, e):
        per_token -= e * config.hidden_size
        whole += n * e * config.hidden_size
    if micro_batch_size == 1:
        per_token -= INT64
        whole += n * INT64
    return micro_batch_size * math.ceil(seq_len / slices) * per_token + whole + LOSS_TOTAL_WEIGHT


def embedding_saved_bytes(config: PretrainedConfig) -> int:
    """Per token: the int64 token ids (and GPT-2's position ids, one per token of a sequence)."""
    return INT64 * (2 if config.model_type == "gpt2" else 1)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def measure_saved_activation_bytes(fn, *args, exclude=(), **kwargs) -> int:
    """Peak bytes of the storages autograd saves while `fn(*args, **kwargs)` runs, each storage
    counted once and released when autograd frees it (after backward), tensors sharing a storage
    with `exclude` (parameters, buffers, tables) left out. Run forward and backward inside `fn`
    to get the live peak over both; run the forward only to get everything saved.

    A thin wrapper over bll_ds.pipeline.trace.SavedActivationMeter, the meter the engines use."""
    meter = SavedActivationMeter()
    meter.exclude(exclude)
    with meter.hooks():
        fn(*args, **kwargs)
    return meter.peak_bytes


@functools.lru_cache(maxsize=None)
def runtime_baseline_mb(modules: tuple[str, ...] = ("torch", "deepspeed", "transformers")) -> float:
    """Peak RSS (MB) of a fresh interpreter that only imports `modules`: the part of a training
    process's RSS that the planner does not model. Read from VmHWM, not ru_maxrss: a child's
    ru_maxrss starts at its parent's RSS at fork time (Linux carries it across exec)."""
    code = f"import {', '.join(modules)}\n" \
           "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024)"
    env = {"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env, cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Parameters (built on the meta device: exact counts, no memory)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleSize:
    trainable: int = 0     # parameters the optimizer updates
    frozen: int = 0        # parameters with requires_grad=False (weights, no gradient)
    buffers: int = 0       # buffer elements (DeepSpeed casts floating buffers to the model dtype)

    def __add__(self, other: "ModuleSize") -> "ModuleSize":
        return ModuleSize(self.trainable + other.trainable, self.frozen + other.frozen,
                          self.buffers + other.buffers)

    def times(self, count: int) -> "ModuleSize":
        return ModuleSize(self.trainable * count, self.frozen * count, self.buffers * count)


def _module_size(module: torch.nn.Module) -> ModuleSize:
    params = list(module.parameters())
    return ModuleSize(trainable=sum(p.numel() for p in params if p.requires_grad),
                      frozen=sum(p.numel() for p in params if not p.requires_grad),
                      buffers=sum(b.numel() for b in module.buffers()))


_SIZE_CACHE: dict[tuple, ModuleSize] = {}


def _cached_size(config: PretrainedConfig, key: str, build) -> ModuleSize:
    """Build on the meta device once per (config, piece): the cluster search plans hundreds of runs."""
    cache_key = (config.to_json_string(), key)
    if cache_key not in _SIZE_CACHE:
        with torch.device("meta"):
            _SIZE_CACHE[cache_key] = _module_size(build())
    return _SIZE_CACHE[cache_key]


def pipeline_piece_sizes(config: PretrainedConfig) -> tuple[ModuleSize, ModuleSize, ModuleSize]:
    """(embedding, one decoder layer, head), built from the pipeline's own LayerSpecs."""
    specs = layer_specs(config)
    return tuple(_cached_size(config, name, specs[i].build)
                 for name, i in (("embedding", 0), ("layer", 1), ("head", len(specs) - 1)))


def feedback_size(config: PretrainedConfig, variant: str, input_critic: bool = False, last: bool = False) -> ModuleSize:
    """A BLL feedback block as build_engine builds it (pipeline/build.py build_stage_feedback): a
    non-last stage's, with the critic of its input where `input_critic`, or the last stage's."""
    return _cached_size(config, f"feedback:{variant}:{input_critic}:{last}",
                        lambda: variants.get(variant).build(config, input_critic=input_critic, last=last))


def stage_sizes(config: PretrainedConfig, stages: int, method: str, variant: str = "prototype") -> list[ModuleSize]:
    """Per stage: its decoder layers, the embedding on stage 0, the head on the last stage, and
    under BLL the feedback block where the stage holds one (every stage but the last; the last
    too, and a critic of the input on every stage but the first, under the critic variants)."""
    embedding, layer, head = pipeline_piece_sizes(config)
    chosen = variants.get(variant)
    sizes = []
    for stage, layers in enumerate(stage_layer_counts(config, stages)):
        size = layer.times(layers)
        if stage == 0:
            size = size + embedding
        if stage == stages - 1:
            size = size + head
        if method == "bll" and stages > 1 and chosen.holds_block(stage, stages):
            size = size + feedback_size(config, variant, input_critic=chosen.trains_input_critic and stage > 0,
                                        last=stage == stages - 1)
        sizes.append(size)
    return sizes


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """One training configuration (what `plan` takes, besides the model)."""
    stages: int
    dp: int
    micro_batch_size: int
    seq_len: int
    micro_batches: int
    dtype: str = "bf16"
    zero_stage: int = 1
    method: str = "bll"
    variant: str = "prototype"
    grad_accum_dtype: str = "fp32"   # ds_configs/*.json: "data_types": {"grad_accum_dtype": "fp32"}
    readout_max_logits_mb: float = READOUT_MAX_LOGITS_MB  # --bll_readout_max_logits_mb (0 = one slice)
    activation_checkpoint_interval: int = 0  # --activation_checkpoint_interval (0 = off)

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES or self.grad_accum_dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype and grad_accum_dtype must be one of {sorted(DTYPE_BYTES)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}")
        variants.get(self.variant)  # raises, naming the registered variants
        if self.zero_stage not in (0, 1):
            raise ValueError("only ZeRO stages 0 and 1 are planned (pipelines cannot use 2 or 3)")
        if self.readout_max_logits_mb < 0:
            raise ValueError("readout_max_logits_mb must be >= 0 (0 = one slice)")
        if self.activation_checkpoint_interval < 0:
            raise ValueError("activation_checkpoint_interval must be >= 0 (0 = off)")
        if self.dtype == "bf16" and self.zero_stage == 0 and self.grad_accum_dtype == "fp32":
            raise ValueError("DeepSpeed refuses bf16 with ZeRO-0 and fp32 gradient accumulation; "
                             "use --zero 1, or grad_accum_dtype bf16")
        if self.dtype == "fp32":
            object.__setattr__(self, "grad_accum_dtype", "fp32")

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class StageMemory:
    """Bytes one rank of pipeline stage `stage` holds (per data-parallel replica)."""
    stage: int
    decoder_layers: int
    params: int                  # trainable parameters (forward layers + feedback block)
    weight_bytes: int            # parameters and buffers in the model dtype
    grad_bytes: int
    optimizer_bytes: int         # Adam moments (+ fp32 master copy), this DP rank's ZeRO-1 share
    table_bytes: int             # BLL target tables (inbox, m_k and its gradient, outbox)
    buffer_bytes: int            # kept across micro-batches: receive/gradient buffers, send window (worst case), rotary tables
    in_flight: int               # micro-batches whose activations are held at the peak
    readout_slices: int          # sequence slices of the BLL local readout (1: unsliced, BP, last stage)
    saved_per_micro_batch: int   # peak autograd-saved bytes of one micro-batch, tables excluded (rotary tables included)
    activation_bytes: int        # the stash at the peak: in_flight micro-batches' saved tensors and pipe buffers
    transient_bytes: int         # short-lived working set on top of the stash
    step_transient_bytes: int    # at the step boundary, when no micro-batch is alive
    meter_bytes: int             # what the engines' SavedActivationMeter should report for this stage
    checkpointed_groups: int = 0  # activation checkpointing: groups of decoder layers recomputed in backward
    recompute_bytes: int = 0     # saved by the worst group's recompute, beyond the input it keeps (rotary excluded)

    @property
    def static_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.table_bytes + self.buffer_bytes

    @property
    def peak_bytes(self) -> int:
        during_micro_batch = self.activation_bytes + self.transient_bytes
        return self.static_bytes + max(during_micro_batch, self.step_transient_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "static_bytes": self.static_bytes, "peak_bytes": self.peak_bytes}


def plan(spec_path, stages: int, dp: int, micro_batch_size: int, seq_len: int, micro_batches: int,
         dtype: str = "bf16", zero_stage: int = 1, method: str = "bll", *, variant: str = "prototype",
         vocab_size: int | None = None, grad_accum_dtype: str = "fp32",
         readout_max_logits_mb: float = READOUT_MAX_LOGITS_MB,
         activation_checkpoint_interval: int = 0) -> list[StageMemory]:
    """Per-stage memory of a pipeline run. `spec_path`: a models/*.json spec (or a loaded config).
    readout_max_logits_mb: as --bll_readout_max_logits_mb (BLL's local readout in sequence slices
    whose fp32 logits stay under it; 0 = one slice). activation_checkpoint_interval: as
    --activation_checkpoint_interval (0 = off; see `_body_phases`)."""
    config = spec_path if isinstance(spec_path, PretrainedConfig) else load_model_spec(spec_path, vocab_size)
    _warn_about_dropout(config)
    setup = Setup(stages, dp, micro_batch_size, seq_len, micro_batches, dtype, zero_stage, method, variant,
                  grad_accum_dtype, readout_max_logits_mb, activation_checkpoint_interval)
    if method == "bll" and stages > 1 and not is_modelled(variant):
        raise ValueError(f"activations of the {variant!r} readout are not modelled; plan one of {modelled_variants()}")
    sizes = stage_sizes(config, stages, method, variant)
    layer_counts = stage_layer_counts(config, stages)
    return [_stage_memory(config, setup, k, layer_counts[k], sizes[k]) for k in range(stages)]


def _warn_about_dropout(config: PretrainedConfig) -> None:
    """Dropout masks are not modelled; every spec in models/ sets dropout to 0."""
    fields = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout")
    active = {f: getattr(config, f) for f in fields if getattr(config, f, 0)}
    if active:
        warnings.warn(f"dropout {active} adds masks the memory plan does not count", stacklevel=3)


def max_stage_bytes(stages: list[StageMemory]) -> int:
    return max(s.peak_bytes for s in stages)


def _stage_memory(config, setup: Setup, stage: int, layers: int, size: ModuleSize) -> StageMemory:
    first, last = stage == 0, stage == setup.stages - 1
    weights, grads, optimizer = _weights_grads_optimizer(size, setup)
    slices = _slices(config, setup, last)
    body = _body_phases(config, setup, layers, first, last)
    readout, block_grad = _readout_phases(config, setup, first, last, slices)
    forward = body.forward + max(readout, block_grad)   # the micro-batch's saved bytes once its forward (and loss) ran
    saved = max(forward, body.recompute)                # ... and at the worst point of its backward
    rope = layers * rope_table_bytes(config, setup.seq_len, setup.e)
    in_flight = min(setup.stages - stage, setup.micro_batches) if setup.method == "bp" else 1
    pipe = _pipe_bytes_per_micro_batch(config, setup, first, last, body.keeps_received_input)
    # In flight: every micro-batch's stash and pipe buffers; during one micro-batch's backward,
    # its worst recompute on top of what of its stash is still alive (rotary tables: buffer_bytes).
    forward_stash = forward - body.forward_rope
    recompute_extra = max(0, body.recompute - body.recompute_rope - forward_stash) if body.groups else 0
    tables = _table_bytes(config, setup, first, last)
    return StageMemory(
        stage=stage, decoder_layers=layers, params=size.trainable,
        weight_bytes=weights, grad_bytes=grads, optimizer_bytes=optimizer, table_bytes=tables,
        buffer_bytes=rope + _pipe_bytes_kept(config, setup, first, last),
        in_flight=in_flight, readout_slices=slices, saved_per_micro_batch=saved,
        activation_bytes=in_flight * (forward_stash + pipe) + recompute_extra,
        transient_bytes=_transient_bytes(config, setup, layers, first, last, slices),
        step_transient_bytes=_step_transient_bytes(config, setup, size, last),
        meter_bytes=_meter_bytes(config, setup, in_flight, forward, body, readout, block_grad, last),
        checkpointed_groups=body.groups, recompute_bytes=body.recompute_group)


def _weights_grads_optimizer(size: ModuleSize, setup: Setup) -> tuple[int, int, int]:
    """See the module docstring's table."""
    e, params = setup.e, size.trainable
    weights = e * (size.trainable + size.frozen + size.buffers)
    adam = 2 * FP32 * params
    if setup.dtype == "fp32" and setup.zero_stage == 0:
        return weights, FP32 * params, adam
    if setup.dtype == "fp32":
        return weights, FP32 * params, (FP32 * params + adam) // setup.dp
    accumulation = DTYPE_BYTES[setup.grad_accum_dtype] * params
    return weights, e * params + accumulation, (FP32 * params + adam) // setup.dp


def _readout_on_stage(setup: Setup, last: bool) -> bool:
    """Whether this stage computes a loss: the last stage always, every stage under BLL."""
    return last or setup.method == "bll"


def _slices(config, setup: Setup, last: bool) -> int:
    """The local readout's sequence slices on this stage (BLLPipelineEngine._bll_local_backward:
    never on the last stage, whose loss is the LM head's)."""
    if setup.method != "bll" or last:
        return 1
    return readout_slices(setup.variant, setup.micro_batch_size, setup.seq_len, config.vocab_size,
                          setup.readout_max_logits_mb)


def _input_requires_grad(setup: Setup, first: bool) -> bool:
    """BP receives inputs that need a gradient (it is sent upstream); BLL's received inputs do not
    (bll_engine._bll_recv_activations), so the stage's first norm saves less. Stage 0's input is
    the embedding's output, which does."""
    return first or setup.method == "bp"


@dataclass(frozen=True)
class BodyPhases:
    """Saved bytes of one micro-batch's forward layers (embedding, decoder layers), rotary
    tables included where saved (the `_rope` parts, which the memory total counts once, as
    buffer_bytes)."""
    forward: int                # after the forward, until the backward reaches them
    forward_rope: int
    recompute: int = 0          # peak during the backward of the worst checkpointed group (0: none)
    recompute_rope: int = 0
    groups: int = 0             # checkpointed groups
    recompute_group: int = 0    # that group's recomputed saved bytes beyond its kept input (rotary excluded)
    keeps_received_input: bool = False  # a checkpointed first group saves the received input itself


def _decoder_saved_per_token(config, e: int, input_requires_grad: bool) -> int:
    """One decoder layer; a Llama RMSNorm saves less when its input needs no gradient."""
    full = decoder_layer_saved_bytes(config, e)
    if input_requires_grad:
        return full
    return full - (norm_saved_bytes(config, e) - norm_saved_bytes(config, e, input_requires_grad=False))


def _body_phases(config, setup: Setup, layers: int, first: bool, last: bool) -> BodyPhases:
    """Saved by one micro-batch's forward layers, alive until the block's backward.

    Activation checkpointing (interval c > 0, bll_ds/modeling/checkpointing.py): the stage's layer
    list (embedding first on stage 0, head last on the last stage) is cut into groups of c, as
    DeepSpeed's PipelineModule cuts it; a group of decoder layers only is checkpointed, any other
    group runs as usual. A checkpointed group keeps only its input ([n, hidden], the model dtype)
    through the micro-batch; when the backward reaches it, it runs its forward again and holds
    that group's saved tensors (its rotary tables too) until its backward is done. At that point
    the readout, the later groups and their kept inputs are freed, the earlier groups' still
    held. Where the group's first norm saves its input itself (`norm_saves_its_input`), that is
    the kept input's storage, counted once. The stage's first group receives the stage input
    (needing a gradient under BP, not under BLL after stage 0); every later group's input needs
    one."""
    n, e, width = setup.tokens, setup.e, config.hidden_size
    rope = rope_table_bytes(config, setup.seq_len, e)
    classes = ["TokenEmbedding"] * first + ["DecoderLayer"] * layers + ["OutputHead"] * last
    live = n * embedding_saved_bytes(config) if first else 0  # freed last: held through every recompute
    live_rope = 0
    worst = (0, 0, 0)  # (recompute peak, its rotary part, the group's recompute beyond its input)
    groups, keeps_received = 0, False
    for index, (start, end, checkpointed) in enumerate(checkpointed_groups(classes, setup.activation_checkpoint_interval)):
        decoders = classes[start:end].count("DecoderLayer")
        if not decoders:
            continue
        requires_grad = _input_requires_grad(setup, first) if index == 0 and not first else True
        full = n * (_decoder_saved_per_token(config, e, requires_grad)
                    + (decoders - 1) * _decoder_saved_per_token(config, e, True))
        if not checkpointed:
            live, live_rope = live + full, live_rope + decoders * rope
            continue
        groups += 1
        kept = n * width * e
        keeps_received = keeps_received or (index == 0 and not first)
        recompute = full - (kept if norm_saves_its_input(config, e, requires_grad) else 0)
        peak = (live + kept + recompute + live_rope + decoders * rope, live_rope + decoders * rope, recompute)
        worst = max(worst, peak)
        live += kept
    return BodyPhases(forward=live + live_rope, forward_rope=live_rope, recompute=worst[0], recompute_rope=worst[1],
                      groups=groups, recompute_group=worst[2], keeps_received_input=keeps_received)


def _readout_phases(config, setup: Setup, first: bool, last: bool, slices: int) -> tuple[int, int]:
    """(readout, block gradient): the loss's saved bytes at their peak (one slice's where the
    readout is sliced; 0 on BP's non-last stages, which compute no loss), and, where it is sliced,
    the block output's accumulated gradient that the block's surrogate backward saves once the
    slices are done (`hidden * detached.grad`). The micro-batch's peak is the body plus the larger.
    The readout includes the critic of the stage's input where the variant trains one."""
    if not _readout_on_stage(setup, last):
        return 0, 0
    variant = LM_HEAD if last else setup.variant
    readout = sliced_readout_saved_bytes(config, setup.e, setup.micro_batch_size, setup.seq_len, slices, variant)
    block_grad = setup.tokens * config.hidden_size * setup.e if slices > 1 else 0
    return readout + _input_critic_saved_bytes(config, setup, first, last), block_grad


def _trains_input_critic(setup: Setup, first: bool) -> bool:
    """Whether this stage trains a critic of its input (critic.py): BLL, every stage but the first."""
    return setup.method == "bll" and setup.stages > 1 and not first and variants.get(setup.variant).trains_input_critic


def _input_critic_saved_bytes(config, setup: Setup, first: bool, last: bool) -> int:
    """The critic's saved tensors, alive with the loss's (StageStep.local_backward runs one backward
    of both; the critic variants are never sliced). Its norm reads the stage's input, detached:
    where that norm saves the input itself (GPT-2's LayerNorm), it is the received tensor the
    first layer's norm saved already, so only the rest is the critic's."""
    if not _trains_input_critic(setup, first):
        return 0
    e = setup.e
    norm = norm_saved_bytes(config, e, input_requires_grad=False)
    if norm_saves_its_input(config, e, input_requires_grad=False):
        norm -= e * config.hidden_size
    return variants.get(setup.variant).input_critic_saved_bytes(config, e, norm, setup.tokens, last)


def _pipe_bytes_per_micro_batch(config, setup: Setup, first: bool, last: bool,
                                keeps_received_input: bool = False) -> int:
    """Pipe buffers a micro-batch keeps until its backward, beyond its saved tensors."""
    n, e, width = setup.tokens, setup.e, config.hidden_size
    held = 0
    if not first:
        # BP: the received tensor waits for its .grad while the forward runs on a clone (DeepSpeed
        # _exec_forward_pass). BLL: the forward runs on the received tensor itself, which only
        # GPT-2's LayerNorm saves (a Llama RMSNorm saves it only when it needs a gradient), and a
        # checkpointed first group (it keeps its input).
        saved = norm_saves_its_input(config, e, input_requires_grad=False) or keeps_received_input
        if setup.method == "bp" or not saved:
            held += n * width * e
    if last:
        held += n * config.vocab_size * e   # logits, kept in pipe_buffers["outputs"]
    elif setup.method == "bp":
        held += n * width * e               # output, kept until its gradient arrives
    # BLL's non-last output is in the send window (_pipe_bytes_kept).
    return held


def _pipe_bytes_kept(config, setup: Setup, first: bool, last: bool) -> int:
    """Buffers that outlive micro-batches: DeepSpeed's receive buffer (pipe_recv_buf) and gradient
    buffer (grad_layer), and BLL's send window of detached outputs.

    The send window is counted at its worst case, 2M outputs (max_inflight_sends, reached when
    the receiver is slow). BLLPipelineEngine._bll_send_activations releases completed isends at
    the next send, so with a prompt receiver it typically holds only the one or two in flight; a
    plan that must fit counts the worst case."""
    n, e, width = setup.tokens, setup.e, config.hidden_size
    kept = 0 if first else n * width * e
    if last:
        return kept
    if setup.method == "bp":
        return kept + n * width * e
    window = SEND_WINDOW_PER_MICRO_BATCH * setup.micro_batches
    if norm_saves_its_input(config, e):
        # The current micro-batch's output is already counted as the readout norm's saved input
        # (sliced or not: a slice saves the whole output's storage).
        window -= 1
    return kept + window * n * width * e


def _has_tables(setup: Setup) -> bool:
    return setup.method == "bll" and setup.stages > 1 and variants.get(setup.variant).sends_table


def _has_feedback_network(setup: Setup) -> bool:
    """Whether the received table goes through g_k (feedback.TableFeedback: m_k, its gradient,
    finish_step); the critic's message is read as it arrives."""
    return _has_tables(setup) and issubclass(variants.get(setup.variant).block, TableFeedback)


def _table_bytes_saved_in_readout(config, setup: Setup, last: bool) -> int:
    """What of the table every micro-batch's readout saves. m_k, the product's right operand: a
    leaf computed once per step without a graph (feedback.TableFeedback.targets), held anyway.
    A sampled softmax (neg=n) gathers the candidate rows first: the product saves those rows
    (the variant's readout_saved_bytes_per_micro_batch), and the gather saves only their ids.
    The critic's readout reads the received message itself: its product saves U_k (a view of
    the message) unless neg=n gathers rows, and with dim=r the product with Q_k saves Q_k, also
    a view; either way the message's whole storage. Where table= makes the message travel in
    another dtype, the readout saves copies instead (its readout_saved_bytes_per_micro_batch)."""
    if not _has_tables(setup) or last:
        return 0
    variant = variants.get(setup.variant)
    if not _has_feedback_network(setup):
        saves_a_view = not variant.options.neg or variant.block.reduces(variant.options, config)
        return _table_elements(config, setup) * setup.e if saves_a_view and _message_element_bytes(setup) == setup.e else 0
    if variant.options.neg:
        return 0
    return _table_elements(config, setup) * setup.e


def _finish_step_saved_bytes(config, setup: Setup, last: bool) -> int:
    """Saved by finish_step's recompute of g_k and its surrogate product: the received table
    (up's input), up's and gelu's outputs ([V, g_k hidden] each) and m_k's accumulated gradient.
    Only alive at the step's end, when no micro-batch is."""
    if not _has_feedback_network(setup) or last:
        return 0
    vocab, e = config.vocab_size, setup.e
    return 2 * _table_elements(config, setup) * e + 2 * vocab * _feedback_hidden(config, setup) * e


def _meter_bytes(config, setup: Setup, in_flight: int, forward: int, body: BodyPhases, readout: int,
                 block_grad: int, last: bool) -> int:
    """The engines' SavedActivationMeter peak (weights excluded; it meters the forward, local
    backward and FinishStep instructions, bll_ds/pipeline/trace.py SAVES_ACTIVATIONS). BP: the 1F1B
    stash (rotary tables saved by the forward counted once); its BackwardPass is not metered, so
    a checkpointed group's recompute is not seen there (`activation_bytes` counts it). BLL: one
    micro-batch (its body, then the larger of its readout, with m_k saved by the product, and the
    block's surrogate backward; with checkpointing, the worst group's recompute in the local
    backward), or finish_step's recompute of g_k."""
    if setup.method == "bp":
        return in_flight * (forward - body.forward_rope) + body.forward_rope
    during_micro_batch = body.forward + max(readout + _table_bytes_saved_in_readout(config, setup, last), block_grad)
    return max(during_micro_batch, body.recompute, _finish_step_saved_bytes(config, setup, last))


def _table_bytes(config, setup: Setup, first: bool, last: bool) -> int:
    """The inbox queue (LAG + 1) and, through a feedback network, m_k with its accumulated
    gradient (non-last stages), the messages the variant holds beyond the inbox (non-last stages), the outbox
    (non-first stages). g_k's activations are not held
    (finish_step recomputes them)."""
    if not _has_tables(setup):
        return 0
    elements = _table_elements(config, setup)
    message = elements * _message_element_bytes(setup)  # inbox and outbox: the dtype it travels in
    held = 0 if first else OUTBOX_TABLES * message
    if not last:
        held += INBOX_TABLES * message  # the queue
        held += variants.get(setup.variant).held_messages() * message  # e.g. extrap='s previous message and C_hat
        if _has_feedback_network(setup):
            held += 2 * elements * setup.e  # m_k and its gradient
    return held


def _table_elements(config, setup: Setup) -> int:
    """Entries of the variant's table: V x r (r = H unless the variant's dim=r option)."""
    return math.prod(variants.get(setup.variant).message_shape(config))


def _message_element_bytes(setup: Setup) -> int:
    """Bytes per entry of the message as it travels and waits in the inbox (table=bf16: 2)."""
    import torch

    dtype = {FP32: torch.float32, 2: torch.bfloat16}.get(setup.e, torch.float32)
    return variants.get(setup.variant).message_dtype(dtype).itemsize


def _feedback_hidden(config, setup: Setup) -> int:
    # TableMap(width, hidden or width): build_feedback passes no hidden, so g_k is r wide
    return variants.get(setup.variant).readout_width(config)


def _transient_bytes(config, setup: Setup, layers: int, first: bool, last: bool, slices: int) -> int:
    """Largest short-lived allocation during a micro-batch (estimate): a layer's backward
    (bounded by its saved bytes), the loss's backward (two fp32 [tokens, V] gradients, of one
    slice where the readout is sliced, plus the block output's gradient accumulated over the
    slices; two [tokens, C] more where the same backward trains a critic of the input), or BLL's
    table_drift diagnostic, once per step in the first micro-batch's readout (fp32 copies of two
    [V, H] tables and their difference in bf16)."""
    n, e = setup.tokens, setup.e
    candidates = [n * decoder_layer_saved_bytes(config, e) if layers else 0]
    if _readout_on_stage(setup, last):
        slice_tokens = setup.micro_batch_size * math.ceil(setup.seq_len / slices)
        accumulated = n * config.hidden_size * e if slices > 1 else 0
        local = variants.get(setup.variant).readout_candidates(config, n)
        width = config.vocab_size if last else local
        critic = 2 * FP32 * n * local if _trains_input_critic(setup, first) else 0
        candidates.append(2 * FP32 * slice_tokens * width + accumulated + critic)
    if _has_feedback_network(setup) and not last:
        copies = 1 if e == FP32 else 3
        candidates.append(copies * FP32 * _table_elements(config, setup))
    return max(candidates)


def _step_transient_bytes(config, setup: Setup, size: ModuleSize, last: bool) -> int:
    """At the step boundary: the gradient reduction's flat fp32 copy (BF16_Optimizer's allreduce,
    DeepSpeedZeroOptimizer's reduce bucket; plus ZeRO-1 fp32's flattened partition), Adam's
    foreach scratch on the partition, or finish_step (m_k and its gradient are in table_bytes):
    g_k's recomputed forward (up's and gelu's outputs, m_k again) and, in its backward, the
    gradients of m_k and of gelu's and up's outputs, V x (2 H + 3 g_k hidden) in all."""
    params = size.trainable
    reduce_copy = FP32 * params
    if setup.dtype == "fp32" and setup.zero_stage == 1:
        reduce_copy += FP32 * params // setup.dp
    scratch = FP32 * params // (setup.dp if setup.zero_stage == 1 or setup.dtype == "bf16" else 1)
    finish = 0
    if _has_feedback_network(setup) and not last:
        finish = (2 * _table_elements(config, setup) + 3 * config.vocab_size * _feedback_hidden(config, setup)) * setup.e
    return max(reduce_copy, scratch, finish)


# ---------------------------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuBudget:
    """What a stage may use on one GPU. 80 GiB cards (A100/H100 80GB report 79.6-80 GiB);
    10% headroom for fragmentation and allocator rounding; a fixed runtime overhead for the CUDA
    context (~0.5 GiB), NCCL communicators and their buffers (pipeline + data-parallel groups),
    cuBLAS/cuDNN workspaces and the Python/torch/DeepSpeed runtime."""
    memory_bytes: int = 80 * GIB
    headroom: float = 0.10
    runtime_overhead_bytes: int = 3 * GIB

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * (1 - self.headroom)) - self.runtime_overhead_bytes


CLUSTER_MODELS = ("models/llama-1b.json", "models/llama-7b.json", "models/llama-13b.json")
STAGE_OPTIONS = (1, 2, 4, 8, 16, 32)
DP_OPTIONS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class ClusterOption:
    stages: int
    dp: int | None           # smallest data-parallel degree that fits (None: none of DP_OPTIONS)
    gpus: int | None
    max_stage_gib: float     # at that DP (or at the largest DP tried)
    bottleneck_stage: int


@dataclass
class ClusterAnswer:
    model: str
    method: str
    params_b: float
    best: ClusterOption | None
    options: list[ClusterOption] = field(default_factory=list)


def smallest_cluster(spec_path, method: str, micro_batch_size: int = 1, seq_len: int = 2048,
                     micro_batches_per_stage: int = 4, dtype: str = "bf16", zero_stage: int = 1,
                     gpu: GpuBudget = GpuBudget(), stage_options=STAGE_OPTIONS, dp_options=DP_OPTIONS,
                     readout_max_logits_mb: float = READOUT_MAX_LOGITS_MB,
                     activation_checkpoint_interval: int = 0, variant: str = DEFAULT_VARIANT) -> ClusterAnswer:
    """For each pipeline depth S (at most the layer count), the smallest DP whose every stage fits;
    the best option has the fewest GPUs (S x DP), ties going to the shallower pipeline. `variant`:
    BLL's (ignored for BP)."""
    config = load_model_spec(spec_path)
    options = []
    for stages in (s for s in stage_options if s <= config.num_hidden_layers):
        option = None
        for dp in dp_options:
            stage_plan = plan(config, stages, dp, micro_batch_size, seq_len, micro_batches_per_stage * stages,
                              dtype, zero_stage, method, variant=variant, readout_max_logits_mb=readout_max_logits_mb,
                              activation_checkpoint_interval=activation_checkpoint_interval)
            worst = max(stage_plan, key=lambda s: s.peak_bytes)
            option = ClusterOption(stages, None, None, round(worst.peak_bytes / GIB, 2), worst.stage)
            if worst.peak_bytes <= gpu.usable_bytes:
                option = ClusterOption(stages, dp, stages * dp, round(worst.peak_bytes / GIB, 2), worst.stage)
                break
        options.append(option)
    fitting = [o for o in options if o.gpus is not None]
    best = min(fitting, key=lambda o: (o.gpus, o.stages)) if fitting else None
    total = sum(s.trainable for s in stage_sizes(config, 1, "bp"))
    return ClusterAnswer(str(spec_path), method, round(total / 1e9, 2), best, options)


def write_clusters(out_dir: Path, models=CLUSTER_MODELS, micro_batch_size: int = 1,
                   sensitivity_micro_batch_sizes=(1, 2, 4, 8), **kwargs) -> list[ClusterAnswer]:
    """clusters.json / clusters.md: the smallest cluster per model and method at
    `micro_batch_size`, and the GPU count at other micro-batch sizes (same other settings)."""
    answers = [smallest_cluster(model, method, micro_batch_size=micro_batch_size, **kwargs)
               for model in models for method in METHODS]
    sensitivity = {b: {(a.model, a.method): a.best for a in answers} if b == micro_batch_size else
                   {(m, meth): smallest_cluster(m, meth, micro_batch_size=b, **kwargs).best
                    for m in models for meth in METHODS}
                   for b in sensitivity_micro_batch_sizes}
    gpu = kwargs.pop("gpu", GpuBudget())
    settings = {"micro_batch_size": micro_batch_size, "seq_len": 2048, "micro_batches_per_stage": 4,
                "dtype": "bf16", "zero_stage": 1, "readout_max_logits_mb": READOUT_MAX_LOGITS_MB,
                "activation_checkpoint_interval": 0, "variant": DEFAULT_VARIANT, **kwargs}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "clusters.json").write_text(json.dumps(
        {"settings": settings, "gpu": {**asdict(gpu), "usable_bytes": gpu.usable_bytes},
         "answers": [asdict(a) for a in answers],
         "by_micro_batch_size": {str(b): [{"model": m, "method": meth, "best": asdict(o) if o else None}
                                          for (m, meth), o in best.items()]
                                 for b, best in sensitivity.items()}}, indent=1))
    (out_dir / "clusters.md").write_text(_clusters_markdown(answers, sensitivity, settings, gpu))
    return answers


def _checkpointing_sentence(interval: int) -> str:
    if not interval:
        return "No activation checkpointing in either method."
    return (f"Activation checkpointing in both methods, every {interval} decoder layer(s): a micro-batch keeps "
            "each checkpointed group's input only, and one group's activations while its backward recomputes "
            "them.")


def _option_cell(option: ClusterOption) -> str:
    if option.gpus is None:
        return f"no fit ({option.max_stage_gib} GiB at DP {DP_OPTIONS[-1]})"
    return f"DP {option.dp}: {option.gpus} GPUs, {option.max_stage_gib} GiB"


def _best_cell(option: ClusterOption | None) -> str:
    return f"{option.gpus} (S={option.stages}, DP={option.dp})" if option else "no fit"


def _clusters_markdown(answers: list[ClusterAnswer], sensitivity: dict, settings: dict, gpu: GpuBudget) -> str:
    depths = sorted({o.stages for a in answers for o in a.options})
    lines = ["# Which cluster trains 1B, 7B and 13B: BLL against BP", "",
             f"Settings: {json.dumps(settings)}; M = micro_batches_per_stage x S micro-batches per step.",
             f"GPU: {gpu.memory_bytes / GIB:.0f} GiB, {gpu.headroom:.0%} headroom, "
             f"{gpu.runtime_overhead_bytes / GIB:.1f} GiB runtime overhead: "
             f"{gpu.usable_bytes / GIB:.1f} GiB for the planner's bytes per stage. "
             + _checkpointing_sentence(settings["activation_checkpoint_interval"])
             + f" BLL: variant {settings['variant']}, local readout "
             "in sequence slices of at most readout_max_logits_mb MiB of fp32 logits, send window at its "
             "worst case (2M outputs). Search: S in "
             f"{list(STAGE_OPTIONS)} (at most the layer count), DP in {list(DP_OPTIONS)}; fewest GPUs, "
             "ties to the shallower pipeline.",
             "Planner: bll_bench/memory.py (python -m bll_bench.memory clusters).", "",
             "| model | params | method | smallest cluster (GPUs = S x DP) | S | DP | worst stage (GiB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for a in answers:
        b = a.best
        cells = (f"**{b.gpus}**", b.stages, b.dp, f"{b.max_stage_gib} (stage {b.bottleneck_stage})") if b \
            else ("does not fit", "-", "-", "-")
        lines.append(f"| {Path(a.model).stem} | {a.params_b}B | {a.method.upper()} | "
                     + " | ".join(map(str, cells)) + " |")
    lines += ["", "Every pipeline depth (smallest DP that fits, GPUs, worst stage at that DP):", "",
              "| model | method | " + " | ".join(f"S={s}" for s in depths) + " |",
              "| --- | --- | " + " | ".join("---" for _ in depths) + " |"]
    for a in answers:
        by_depth = {o.stages: o for o in a.options}
        cells = [_option_cell(by_depth[s]) if s in by_depth else "-" for s in depths]
        lines.append(f"| {Path(a.model).stem} | {a.method.upper()} | " + " | ".join(cells) + " |")
    sizes = list(sensitivity)
    lines += ["", "GPUs needed by micro-batch size (same settings otherwise):", "",
              "| model | method | " + " | ".join(f"b={b}" for b in sizes) + " |",
              "| --- | --- | " + " | ".join("---" for _ in sizes) + " |"]
    for a in answers:
        cells = [_best_cell(sensitivity[b][(a.model, a.method)]) for b in sizes]
        lines.append(f"| {Path(a.model).stem} | {a.method.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Validation against measured RSS (docs/results/quality.md, llama-25m, bpe:4096, fp32, ZeRO-1, DP 1,
# 4 micro-batches of 4 x 256 tokens)
# ---------------------------------------------------------------------------------------------

MEASURED_RSS_MB = {  # (method, stages) -> peak RSS per stage, MB, as in docs/results/quality.md
    ("bp", 2): (1639, 1524), ("bll", 2): (1510, 1564),
    ("bp", 4): (1234, 1011, 1015, 1189), ("bll", 4): (1142, 1248, 1237, 1235),
}
LLAMA_25M_RUN = dict(micro_batch_size=4, seq_len=256, micro_batches=4, dtype="fp32", zero_stage=1, dp=1)


def predicted_rss_mb(spec_path, stages: int, dp: int, micro_batch_size: int, seq_len: int, micro_batches: int,
                     dtype: str, zero_stage: int, method: str, baseline_mb: float | None = None,
                     **kwargs) -> list[float]:
    """Per stage: the runtime baseline (a fresh interpreter that imported torch, deepspeed and
    transformers) plus the planner's peak bytes."""
    baseline = runtime_baseline_mb() if baseline_mb is None else baseline_mb
    stage_plan = plan(spec_path, stages, dp, micro_batch_size, seq_len, micro_batches, dtype, zero_stage,
                      method, **kwargs)
    return [baseline + s.peak_bytes / MIB for s in stage_plan]


def rss_check(spec_path="models/llama-25m.json", baseline_mb: float | None = None) -> list[dict]:
    baseline = runtime_baseline_mb() if baseline_mb is None else baseline_mb
    rows = []
    for (method, stages), measured in MEASURED_RSS_MB.items():
        run = {k: v for k, v in LLAMA_25M_RUN.items()}
        predicted = predicted_rss_mb(spec_path, stages, method=method, baseline_mb=baseline, **run)
        for stage, (p, m) in enumerate(zip(predicted, measured)):
            rows.append({"method": method, "stages": stages, "stage": stage, "predicted_mb": round(p),
                         "measured_mb": m, "error": round((p - m) / m, 3)})
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def format_plan(stage_plan: list[StageMemory]) -> str:
    checkpointing = any(s.checkpointed_groups for s in stage_plan)
    cols = ("stage", "layers", "params(M)", "weights", "grads", "optim", "tables", "buffers", "in-flight",
            "slices", *(("ckpt", "recompute") if checkpointing else ()), "stash", "transient", "step-trans", "peak")
    rows = [cols]
    for s in stage_plan:
        rows.append((str(s.stage), str(s.decoder_layers), f"{s.params / 1e6:.1f}",
                     *(_gib(b) for b in (s.weight_bytes, s.grad_bytes, s.optimizer_bytes, s.table_bytes,
                                          s.buffer_bytes)),
                     str(s.in_flight), str(s.readout_slices),
                     *((str(s.checkpointed_groups), _gib(s.recompute_bytes)) if checkpointing else ()),
                     _gib(s.activation_bytes), _gib(s.transient_bytes),
                     _gib(s.step_transient_bytes), _gib(s.peak_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    total = sum(s.peak_bytes for s in stage_plan)
    lines.append(f"GiB per rank of one data-parallel replica; worst stage {_gib(max_stage_bytes(stage_plan))} GiB, "
                 f"all stages together {_gib(total)} GiB (x DP replicas).")
    return "\n".join(lines)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.3f}" if n_bytes < GIB else f"{n_bytes / GIB:.2f}"


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bll_bench.memory", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter,
                                epilog="Two more commands, each with its own --help: `python -m bll_bench.memory "
                                       "clusters` (the smallest GPU cluster per model and method) and `python -m "
                                       "bll_bench.memory rss-check` (the plan against measured CPU RSS).")
    p.add_argument("--model", required=True, help="model spec (HF config JSON), e.g. models/llama-7b.json")
    p.add_argument("--stages", type=int, required=True, help="pipeline stages S")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas per stage (ZeRO-1 divides the optimizer state by it)")
    p.add_argument("--micro_batch_size", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro_batches", type=int, default=None,
                   help="micro-batches M per optimizer step (default: 4 x stages)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="weights' and activations' dtype")
    p.add_argument("--zero", type=int, choices=(0, 1), default=1, help="DeepSpeed ZeRO stage")
    p.add_argument("--method", choices=METHODS, default="bll",
                   help="bp: DeepSpeed's 1F1B backprop; bll: block-local learning")
    p.add_argument("--variant", type=modelled_spec, default=DEFAULT_VARIANT,
                   help="BLL variant with its options (e.g. dgl-context:dim=64:neg=2048; default: the "
                        "project's default variant)")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="vocabulary size in place of the spec's (default: the spec's)")
    p.add_argument("--grad_accum_dtype", choices=sorted(DTYPE_BYTES), default="fp32",
                   help="gradient accumulation dtype of bf16 runs, as DeepSpeed's data_types.grad_accum_dtype "
                        "(fp32 runs accumulate in fp32; bf16 with ZeRO-0 needs bf16)")
    _add_readout_argument(p)
    _add_checkpoint_argument(p)
    p.add_argument("--json", type=Path, default=None, help="also write the per-stage plan here")
    return p


def _clusters_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bll_bench.memory clusters", formatter_class=DefaultsHelpFormatter,
                                description="The smallest GPU cluster (S x DP) that fits 1B, 7B and 13B models, "
                                            "per method, in bf16 with ZeRO-1.")
    p.add_argument("--out", type=Path, required=True, help="folder to write clusters.md and clusters.json")
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--micro_batch_size", type=int, default=1,
                   help="sequences per micro-batch (the tables also give other sizes' GPU counts)")
    p.add_argument("--micro_batches_per_stage", type=int, default=4,
                   help="micro-batches per step per stage: M = this x S")
    p.add_argument("--gpu_gib", type=float, default=80, help="memory of one GPU, GiB")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of the GPU's memory kept free for fragmentation and allocator rounding")
    p.add_argument("--overhead_gib", type=float, default=3.0,
                   help="runtime overhead per GPU, GiB (CUDA context, NCCL, cuBLAS workspaces, the Python runtime)")
    p.add_argument("--variant", type=modelled_spec, default=DEFAULT_VARIANT,
                   help="BLL's variant with its options (default: the project's default variant)")
    _add_readout_argument(p)
    _add_checkpoint_argument(p)
    return p


def _add_readout_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--readout_max_logits_mb", type=float, default=READOUT_MAX_LOGITS_MB,
                   help="as --bll_readout_max_logits_mb: BLL's local readout in sequence slices of at most "
                        "this many MiB of fp32 logits (0 = one slice)")


def _add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activation_checkpoint_interval", type=int, default=0,
                   help="as the trainer's flag: recompute activations in backward every this many layers "
                        "(0 = off, 1 = every decoder layer), for both methods")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "clusters":
        args = _clusters_parser().parse_args(argv[1:])
        gpu = GpuBudget(int(args.gpu_gib * GIB), args.headroom, int(args.overhead_gib * GIB))
        answers = write_clusters(args.out, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len,
                                 micro_batches_per_stage=args.micro_batches_per_stage, gpu=gpu,
                                 readout_max_logits_mb=args.readout_max_logits_mb,
                                 activation_checkpoint_interval=args.activation_checkpoint_interval,
                                 variant=args.variant)
        print((args.out / "clusters.md").read_text())
        return 0 if answers else 1
    if argv and argv[0] == "rss-check":
        p = argparse.ArgumentParser(prog="python -m bll_bench.memory rss-check", formatter_class=DefaultsHelpFormatter,
                                    description="The planner's peak per stage against the peak RSS measured for "
                                                "llama-25m (MEASURED_RSS_MB).")
        p.add_argument("--baseline_mb", type=float, default=None,
                       help="runtime RSS to add (default: measured, a fresh interpreter importing "
                            "torch, deepspeed and transformers)")
        rows = rss_check(baseline_mb=p.parse_args(argv[1:]).baseline_mb)
        for row in rows:
            print(json.dumps(row))
        print(f"mean |error| {sum(abs(r['error']) for r in rows) / len(rows):.1%}")
        return 0
    args = _plan_parser().parse_args(argv)
    stage_plan = plan(args.model, args.stages, args.dp, args.micro_batch_size, args.seq_len,
                      args.micro_batches or 4 * args.stages, args.dtype, args.zero, args.method,
                      variant=args.variant, vocab_size=args.vocab_size, grad_accum_dtype=args.grad_accum_dtype,
                      readout_max_logits_mb=args.readout_max_logits_mb,
                      activation_checkpoint_interval=args.activation_checkpoint_interval)
    print(format_plan(stage_plan))
    if args.json:
        args.json.write_text(json.dumps([s.as_dict() for s in stage_plan], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
