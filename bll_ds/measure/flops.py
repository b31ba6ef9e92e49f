"""Model FLOPs per token, per pipeline stage, for pipeline backprop (BP) and block-local learning.

Conventions (those of the PaLM / Megatron MFU papers, so numbers compare with published MFU):

- A matrix product [m, k] @ [k, n] costs 2*m*n*k FLOPs. Only matrix products are counted:
  norms, activations, softmax, rotary and residual adds are a few percent at most and are left
  out, as `torch.utils.flop_counter.FlopCounterMode` leaves them out.
- Training = forward + backward = 3 x forward: each product is redone twice in the backward
  (gradient of its input, gradient of its weight).
- Attention scores and values cost 2 * 2 * T * H_attn FLOPs per token in the forward (q k^T and
  p v over the whole context of length T). Causal masking is NOT halved: kernels that skip the
  masked half exist, but the convention counts the full square so that MFU numbers stay
  comparable. The attention backward is counted as 2 x its forward like every other product.
- The embedding lookup is a gather: 0 FLOPs.

What FlopCounterMode counts instead (torch 2.13), checked by tests/test_flops.py:
- On CPU the fused SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula
  and counts 0; under the MATH backend it decomposes into bmm's and counts exactly our convention.
- On GPU, the flash / efficient / cuDNN kernels count forward 4*T*H_attn per token (not halved
  either) but backward 5 products instead of 4 (the scores are recomputed), i.e. 2.5 x forward:
  FlopCounterMode's attention training FLOPs are 3.5/3 of ours (tests/test_flops.py guards the
  factor).

Stage layout (DeepSpeed's type-based partition, bll_ds/modeling/pipeline.py): decoder layers per
`stage_layer_counts`, the embedding on stage 0, the LM head (final norm + Linear(H, V)) on the
last stage. Under BLL every stage but the last also runs a local readout (bll_ds/method/feedback.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from bll_ds.method.variants import get as get_variant
from bll_ds.modeling.pipeline import stage_layer_counts

METHODS = ("bp", "bll")
TRAIN_OVER_FORWARD = 3           # forward + input-gradient + weight-gradient products


# ---------------------------------------------------------------------------------------------
# Forward FLOPs per token of the model's pieces
# ---------------------------------------------------------------------------------------------

def _attention_width(config: PretrainedConfig) -> tuple[int, int]:
    """(query width, key/value width): heads x head_dim for queries, kv_heads x head_dim for k, v."""
    heads = config.num_attention_heads
    if config.model_type == "gpt2":
        return config.hidden_size, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads * head_dim, kv_heads * head_dim


def _mlp_width(config: PretrainedConfig) -> int:
    if config.model_type == "gpt2":
        return config.n_inner or 4 * config.hidden_size
    return config.intermediate_size


def layer_projection_flops(config: PretrainedConfig) -> float:
    """Forward FLOPs per token of one decoder layer's weight products (no attention scores)."""
    hidden = config.hidden_size
    q_width, kv_width = _attention_width(config)
    mlp = _mlp_width(config)
    if config.model_type == "gpt2":
        # c_attn H -> 3H, attn c_proj H -> H, mlp c_fc H -> I, mlp c_proj I -> H
        weights = hidden * 3 * hidden + hidden * hidden + 2 * hidden * mlp
    else:
        # q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj (SwiGLU)
        weights = hidden * q_width + 2 * hidden * kv_width + q_width * hidden + 3 * hidden * mlp
    return 2.0 * weights


def layer_attention_flops(config: PretrainedConfig, seq_len: int) -> float:
    """Forward FLOPs per token of q k^T and p v: 2 * 2 * T * H_attn (causal not halved)."""
    q_width, _ = _attention_width(config)
    return 2.0 * 2.0 * seq_len * q_width


def layer_forward_flops(config: PretrainedConfig, seq_len: int) -> float:
    return layer_projection_flops(config) + layer_attention_flops(config, seq_len)


def head_forward_flops(config: PretrainedConfig) -> float:
    """Final norm + lm_head Linear(H, V): 2*H*V per token."""
    return 2.0 * config.hidden_size * config.vocab_size


# ---------------------------------------------------------------------------------------------
# BLL local readouts (non-last stages): each variant declares its own (bll_ds/method/feedback.py)
# ---------------------------------------------------------------------------------------------

class NotModelled(ValueError):
    """A variant that declares no readout FLOPs (cost declarations are optional): the figures that
    need them are null in summary.json and "not modelled" in the simulator and `bench variants`."""

    def __init__(self, variant: str, reason: str | None = None):
        super().__init__(f"BLL variant {variant!r} " + (reason or "declares no readout FLOPs (its class's "
                                                                   "readout_flops_per_token)"))
        self.variant = variant


def readout_flops_per_token(config: PretrainedConfig, variant: str, micro_batch_tokens: int | None = None) -> float:
    """Training FLOPs per token of a non-last stage's local loss (forward + backward), beyond the
    stage's own blocks: prototype and dgl 6HV, drtp 4HV, gaussian and bernoulli 12H^2; with the
    options of bll_ds/method/variant_options.py 6Hr + 6rC per head (C: the candidates of a micro-batch
    of `micro_batch_tokens` tokens). NotModelled where the variant declares none."""
    flops = get_variant(variant).readout_flops_per_token(config, micro_batch_tokens)
    if flops is None:
        raise NotModelled(variant)
    return flops


def readout_flops_per_micro_batch(config: PretrainedConfig, variant: str) -> float:
    """Per micro-batch, independent of its token count (the gaussian / bernoulli collapse guard on
    the whole table: 6VH^2); 0 for the others."""
    return get_variant(variant).readout_flops_per_micro_batch(config)


def readout_flops_per_micro_batch_token(config: PretrainedConfig, variant: str, micro_batch_tokens: int) -> float:
    """The local loss's training FLOPs per token of a micro-batch of `micro_batch_tokens` tokens:
    the per-token readout plus the per-micro-batch costs spread over its tokens."""
    return (readout_flops_per_token(config, variant, micro_batch_tokens)
            + readout_flops_per_micro_batch(config, variant) / micro_batch_tokens)


def feedback_step_flops(config: PretrainedConfig, variant: str) -> float:
    """Per optimizer STEP, per non-last stage: the feedback network's own update (the table
    variants' g_k on the V x H table: 18 V H^2); 0 for dgl and drtp."""
    return get_variant(variant).step_flops(config)


# ---------------------------------------------------------------------------------------------
# Per stage
# ---------------------------------------------------------------------------------------------

@dataclass
class StageFlops:
    """Training FLOPs per token of one stage.

    forward           the stage's own layers (embedding: 0; last stage: with the LM head)
    backward_input    gradient w.r.t. inputs of every product (attention scores included)
    backward_weight   gradient w.r.t. weights (attention scores have none)
    local_readout     BLL only, non-last stages: the local loss forward + backward; with a
                      critic variant (method/critic.py) also, on every stage but the first, the
                      critic of the stage's input
    """

    forward: float
    backward_input: float
    backward_weight: float
    local_readout: float = 0.0

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.local_readout


def _check_method(method: str, variant: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    get_variant(variant)  # raises, naming the registered variants


def stage_flop_split(config: PretrainedConfig, stages: int, seq_len: int, method: str = "bp",
                     variant: str = "prototype", micro_batch_tokens: int | None = None,
                     layers_per_stage: list[float] | None = None) -> list[StageFlops]:
    """Per-stage FLOPs per token, split into forward / backward parts (for schedules that split
    the backward, ZB-H1). `micro_batch_tokens` (default seq_len, i.e. micro-batch size 1)
    amortises per-micro-batch readout costs over tokens. `layers_per_stage` overrides DeepSpeed's
    partition (fractional counts let a projection cut a model into more stages than layers)."""
    _check_method(method, variant)
    counts = layers_per_stage if layers_per_stage is not None else stage_layer_counts(config, stages)
    projection = layer_projection_flops(config)
    attention = layer_attention_flops(config, seq_len)
    head = head_forward_flops(config)
    tokens = micro_batch_tokens or seq_len
    critic = get_variant(variant).input_critic_flops_per_token(config) if method == "bll" else 0.0
    result = []
    for k, layers in enumerate(counts):
        last = k == len(counts) - 1
        weights = layers * projection + (head if last else 0.0)
        scores = layers * attention
        readout = 0.0
        if method == "bll" and not last:
            readout = readout_flops_per_micro_batch_token(config, variant, tokens)
        if k > 0:
            readout += critic
        result.append(StageFlops(forward=weights + scores, backward_input=weights + 2 * scores,
                                 backward_weight=weights, local_readout=readout))
    return result


def stage_flops(config: PretrainedConfig, stages: int, seq_len: int, method: str = "bp",
                variant: str = "prototype", micro_batch_tokens: int | None = None) -> list[float]:
    """Training FLOPs per token (forward + backward, + BLL local readout) of each stage."""
    return [s.total for s in stage_flop_split(config, stages, seq_len, method, variant, micro_batch_tokens)]


@dataclass
class StageStepFlops:
    """One stage's training FLOPs per optimizer step: its model work (layers, and on the ends the
    embedding and LM head) and what block-local learning adds (local loss + feedback update)."""

    model: float
    bll_overhead: float

    @property
    def total(self) -> float:
        return self.model + self.bll_overhead

    @property
    def bll_overhead_share(self) -> float:
        """summary.json's `bll_overhead_flops_share`: the local loss's and the feedback network's
        share of the stage's FLOPs per step (0 under backprop and on the last stage)."""
        return self.bll_overhead / self.total if self.total else 0.0


def stage_step_flops(config: PretrainedConfig, stages: int, seq_len: int, method: str, variant: str,
                     micro_batch_tokens: int, micro_batches: int,
                     layers_per_stage: list[float] | None = None) -> list[StageStepFlops]:
    """Per stage, FLOPs per optimizer step of M micro-batches of `micro_batch_tokens` tokens:
    the per-token split of `stage_flop_split` times the step's tokens, plus the per-step feedback
    update (`feedback_step_flops`) on every non-last BLL stage."""
    split = stage_flop_split(config, stages, seq_len, method, variant, micro_batch_tokens, layers_per_stage)
    tokens = micro_batch_tokens * micro_batches
    result = []
    for k, part in enumerate(split):
        overhead = part.local_readout * tokens
        if method == "bll" and k < len(split) - 1:
            overhead += feedback_step_flops(config, variant)
        result.append(StageStepFlops(model=(part.forward + part.backward) * tokens, bll_overhead=overhead))
    return result


def model_flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs per token of the whole model under backprop: 3 x forward."""
    forward = config.num_hidden_layers * layer_forward_flops(config, seq_len) + head_forward_flops(config)
    return TRAIN_OVER_FORWARD * forward


# ---------------------------------------------------------------------------------------------
# Parameters per stage (for optimizer-step cost estimates)
# ---------------------------------------------------------------------------------------------

def feedback_parameters(config: PretrainedConfig, variant: str) -> float:
    """Trainable parameters of one non-last stage's feedback block and readout, matrices only
    (biases and norm weights left out): the table variants' g_k, gaussian / bernoulli also P,
    dgl its free head [V, H], drtp nothing trainable."""
    return float(get_variant(variant).trainable_matrix_parameters(config))


def embedding_parameters(config: PretrainedConfig) -> float:
    positions = config.max_position_embeddings if config.model_type == "gpt2" else 0
    return (config.vocab_size + positions) * config.hidden_size
