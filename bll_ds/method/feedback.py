"""The feedback network: one feedback block per pipeline stage, with its own weights.

Stage k < S-1 owns one block. It turns the target side of the problem into block k's local loss
(bll_ds/method/messages.py gives the loss families; the default, dgl-context, is dgl plus the
reconstruction terms of bll_ds/method/context.py):

    variant     backward message beta_k                              local loss L_k (per token)
    ---------   --------------------------------------------------   -----------------------------------------
    prototype   q_k(y | z) = softmax_v(<norm(z), m_k(v)>)             -log q_k(y_t | h_k)           (the paper's form)
    gaussian    N(z; nu_k(y_t), s_b^2), nu_k = m_k(y_t)               gaussian_agreement(P norm(h_k), nu_k)
    bernoulli   Bernoulli(sigmoid(nu_k(y_t))), nu_k = m_k(y_t)        bernoulli_agreement(P norm(h_k), nu_k)
    dgl         q_k(y | z) = softmax(W_k norm(z)), W_k free           -log q_k(y_t | h_k)   (Belilovsky et al.)
    drtp        q_k(y | z) = softmax(<norm(z), r(v)>), r fixed random -log q_k(y_t | h_k)   (direct random target projection)

Target tables. For prototype, gaussian and bernoulli the feedback network carries target
information backwards as a table with one row per vocabulary item:

    m_{S-1}(v) = output embedding of v (the last stage's LM-head row)
    m_k        = g_k(m_{k+1})          g_k: stage k's residual MLP, its own weights

Stage k+1 sends m_{k+1} upstream (detached) once per optimizer step; no stage ever receives a
gradient or another stage's weights, and the table never depends on the current forward pass.
L_k trains both forward block k and g_k. The table m_k is computed once per step without a
graph; its gradient is accumulated over the step's micro-batches and pushed through g_k once at
the step's end (`finish_step`, which recomputes g_k's forward rather than holding its [V, H]
activations through the step).

Collapse guard (gaussian, bernoulli): both messages are trainable, so "every table row equal,
every output constant" is a zero-loss solution the paper's reviewers warned about. The guard is a
VICReg-style penalty on both messages' mean parameters E[z] (mu for Gaussian, p for Bernoulli):
each unit's spread (over the vocabulary for the table, over the micro-batch's tokens for the
forward message) is held at >= min_std, and units are decorrelated. The prototype variant needs
none: its beta is a softmax over the whole vocabulary, and equal rows give the uniform
distribution, whose loss is log V, not 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bll_ds.method.messages import bernoulli_agreement, delta_categorical_agreement, gaussian_agreement
from bll_ds.method.variant_options import VariantOptions, fixed_projection, readout_logits, shared_candidates
from bll_ds.method.variants import get as get_variant
from bll_ds.method.variants import register

FP32, INT64, BOOL = 4, 8, 1

def readout_norm(config: PretrainedConfig) -> nn.Module:
    """The same normalisation the LM head applies before its projection."""
    if config.model_type == "gpt2":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class TableMap(nn.Module):
    """g_k: m_k = m_{k+1} + W2 gelu(W1 m_{k+1}). W2 starts at zero, so at initialisation every
    stage's table is the LM head's own output embedding and the local readout starts as the real
    head's readout."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        nn.init.normal_(self.up.weight, std=width ** -0.5)
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return table + self.down(F.gelu(self.up(table)))


class StageFeedback(nn.Module):
    """Base class of every variant. Per optimizer step: `prepare(upstream_table)`, then
    `loss` per micro-batch, then `finish_step`, then (after the optimizer step) `publish()`
    (bll_ds/method/stage_step.py runs them in that order).

    A variant declares its facts here as class methods that take its options first, for the
    engine builder, the memory planner (bll_bench/memory.py) and the FLOPs model
    (bll_ds/measure/flops.py); they are read through its `variants.Variant`, which passes the
    run's options. A built block holds them as `self.options`."""

    name: ClassVar[str] = ""
    sends_table: ClassVar[bool] = False        # its target table m_k travels upstream once per step
    per_token_readout: ClassVar[bool] = False  # the loss is a token mean of per-token terms: sliceable
    # Every stage but the first trains a critic of its input and sends it as its message; the last
    # stage then holds a block too (critic.py).
    trains_input_critic: ClassVar[bool] = False
    # Every stage's table comes from the last stage in one hop instead of through the chain
    # (direct.py); the stages between send nothing.
    tables_from_last_stage: ClassVar[bool] = False

    @classmethod
    def accepted_options(cls) -> frozenset[str]:
        """The options (VariantOptions fields) this variant implements."""
        return frozenset()

    @classmethod
    def sliceable(cls, options: VariantOptions) -> bool:
        """Whether the readout may run in sequence slices with these options."""
        return cls.per_token_readout

    @staticmethod
    def reduces(options: VariantOptions, config: PretrainedConfig) -> bool:
        """Whether dim=r narrows the readout: r below the hidden size (at or above it the readout is
        already that narrow, and dim= changes nothing, so that one spec fits every model)."""
        return 0 < options.dim < config.hidden_size

    @classmethod
    def readout_width(cls, options: VariantOptions, config: PretrainedConfig) -> int:
        """r: the width of the local readout and of the table (dim=r, else the hidden size)."""
        return options.dim if cls.reduces(options, config) else config.hidden_size

    @classmethod
    def readout_candidates(cls, options: VariantOptions, config: PretrainedConfig,
                           micro_batch_tokens: int | None = None) -> int:
        """The width of the local softmax per token: the vocabulary unless an option samples it."""
        return config.vocab_size

    @classmethod
    def readout_flops_per_token(cls, options: VariantOptions, config: PretrainedConfig,
                                micro_batch_tokens: int | None = None) -> float | None:
        """Training FLOPs per token (forward + backward) of the local loss, beyond the stage's blocks,
        in a micro-batch of `micro_batch_tokens` tokens (default one sequence; a shared-candidate
        softmax's width grows with the micro-batch's distinct targets). None: not declared. Such a
        variant trains; the figures that need its cost (summary.json's FLOP rates, the simulator)
        are null or "not modelled" (bll_ds/measure/flops.py NotModelled)."""
        return None

    @classmethod
    def readout_flops_per_micro_batch(cls, options: VariantOptions, config: PretrainedConfig) -> float:
        """Training FLOPs per micro-batch that do not scale with its tokens."""
        return 0.0

    @classmethod
    def step_flops(cls, options: VariantOptions, config: PretrainedConfig) -> float:
        """Training FLOPs once per optimizer step (the feedback network's own update)."""
        return 0.0

    @classmethod
    def input_critic_flops_per_token(cls, options: VariantOptions, config: PretrainedConfig) -> float:
        """Training FLOPs per token of the critic a stage (not the first) trains on its input."""
        return 0.0

    @classmethod
    def input_critic_parameters(cls, options: VariantOptions, config: PretrainedConfig) -> int:
        """Matrix weights of the critic a stage (not the first) trains on its input."""
        return 0

    @classmethod
    def input_critic_saved_bytes_per_token(cls, options: VariantOptions, config: PretrainedConfig, dtype_bytes: int,
                                           norm_saved_bytes: int, micro_batch_tokens: int | None = None) -> int:
        """Bytes autograd saves per token for the critic a stage (not the first) trains on its
        input, given what its norm saves beyond that input (the planner passes it)."""
        return 0

    @classmethod
    def input_critic_saved_bytes_per_micro_batch(cls, options: VariantOptions, config: PretrainedConfig,
                                                 dtype_bytes: int, micro_batch_tokens: int, last: bool) -> int:
        """... and per micro-batch, beyond its tokens (`last`: on the last stage)."""
        return 0

    @classmethod
    def message_shape(cls, options: VariantOptions, config: PretrainedConfig) -> tuple[int, ...] | None:
        """The table stage k+1 sends to stage k once per optimizer step (None: nothing). The
        engine's channel (pipeline/feedback_channel.py) carries the Variant's message_shape."""
        return (config.vocab_size, cls.readout_width(options, config)) if cls.sends_table else None

    @classmethod
    def compose_message(cls, options: VariantOptions, table: torch.Tensor | None, stage_layers) -> torch.Tensor | None:
        """Built on the sending stage k+1 after its optimizer step: its table (m_{k+1}, or W_out on
        the last stage). `stage_layers` are its forward layers, for variants that send more than
        the table; `prepare` on stage k receives the result."""
        return table if cls.sends_table else None

    @classmethod
    def held_messages(cls, options: VariantOptions) -> int:
        """Copies of the received message a stage that reads one holds through the step beyond
        the inbox's (the memory planner counts them with the tables)."""
        return 0

    @classmethod
    def readout_saved_bytes_per_token(cls, options: VariantOptions, config: PretrainedConfig, dtype_bytes: int,
                                      norm_saved_bytes: int, micro_batch_tokens: int | None = None) -> int | None:
        """Bytes autograd saves per token for the local readout, given what its norm saves
        (model-family specific: the planner passes it). None: not modelled by the planner."""
        return None

    @classmethod
    def readout_saved_bytes_per_micro_batch(cls, options: VariantOptions, config: PretrainedConfig,
                                            dtype_bytes: int, micro_batch_tokens: int) -> int:
        """Saved bytes per micro-batch that do not scale with its tokens, beyond the one loss's
        scalar the planner counts anyway (bll_bench/memory.py LOSS_TOTAL_WEIGHT)."""
        return 0

    def __init__(self, config: PretrainedConfig, options: VariantOptions):
        super().__init__()
        self.config, self.options = config, options
        self.variant = None      # its variants.Variant, set by Variant.build
        self.aux = None          # the layer the readout reads through, where the Variant composes one
        self.critic = None       # the critic of this stage's input, where the variant trains one
        self.norm = readout_norm(config)
        self.vocab_size = config.vocab_size
        self._table_leaf = None  # m_k as read by the micro-batches; accumulates dL/dm_k
        self._upstream = None
        self._drift = None       # table_drift of this step, computed once

    def prepare(self, upstream_table: torch.Tensor | None) -> None:
        self._upstream = upstream_table
        self._table_leaf = self._drift = None

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """L_k of block output `hidden`: the variant's local loss, of the readout layer's output
        where the Variant composes one (A_k(h_k) in aux_readout.py, D_k(h_k) in overlap.py)."""
        return self.local_loss(hidden if self.aux is None else self.aux(hidden), labels)

    def local_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    @classmethod
    def last_stage_block(cls, config: PretrainedConfig, options: VariantOptions) -> "StageFeedback":
        """The block the last stage holds, for a variant that trains a critic of every stage's
        input there too (critic.py); the others hold none on the last stage."""
        raise NotImplementedError(f"{cls.__name__} holds no block on the last stage")

    def attach_input_critic(self) -> None:
        """Build the critic of this stage's input (variants that train one; not on the first stage)."""
        raise NotImplementedError

    def input_critic_loss(self, features: torch.Tensor, labels: torch.Tensor,
                          prediction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def finish_step(self, backward) -> None:
        """Once per step, after the micro-batches: train the feedback network (variants without
        one have nothing to do)."""

    def step_tables(self) -> list[torch.Tensor]:
        """What the readout holds for the whole step, computed once per step without a graph
        beside the received message (none here; m_k under a feedback network). Memory accounting
        counts them with the tables, not with a micro-batch's saved activations."""
        return []

    @torch.no_grad()
    def publish(self) -> torch.Tensor | None:
        """The table this stage sends upstream after its optimizer step (None: it sends nothing)."""
        return None


class TableFeedback(StageFeedback):
    """Variants whose targets come from the upstream table through g_k."""

    sends_table = True

    @classmethod
    def accepted_options(cls):
        return super().accepted_options() | {"table", "refresh"}

    @classmethod
    def step_flops(cls, options, config: PretrainedConfig) -> float:
        """g_k (TableMap, r -> Hg -> r, Hg = r as built; r = H unless dim=r) applied to the V x r
        table, per step (written for r = H below):

        targets()     g_k forward once per step, without a graph                2 products: 4 V H Hg
        finish_step   g_k forward again (recomputed rather than held) and its
                      backward: `down` grad of input and weight, `up` grad of
                      weight only (the upstream table is detached)              5 products: 10 V H Hg
        publish()     g_k forward after the optimizer step                      2 products: 4 V H Hg
        """
        width = cls.readout_width(options, config)
        return 18.0 * config.vocab_size * width * width

    @classmethod
    def compose_message(cls, options, table, stage_layers):
        """The last stage's W_out [V, H] enters a reduced readout's width through the fixed
        projection R (so that at initialisation, with P_k = R^T, the local readout is the real
        head's restricted to R's span)."""
        width = options.dim
        if 0 < width < table.shape[-1]:  # W_out, wider than the reduced readout
            table = table @ fixed_projection(table.shape[-1], width).to(table.device, table.dtype)
        return table

    def __init__(self, config: PretrainedConfig, options: VariantOptions):
        super().__init__(config, options)
        width = self.readout_width(options, config)
        self.g = TableMap(width, width)

    def targets(self) -> torch.Tensor:
        """m_k = g_k(m_{k+1}), computed once per step without a graph: the micro-batches only
        accumulate dL/dm_k on it, and finish_step recomputes g_k for its single backward, so
        g_k's activations ([V, H] tensors) are not held through the step."""
        if self._table_leaf is None:
            if self._upstream is None:
                raise RuntimeError("prepare() must be given the upstream table before local_loss()")
            with torch.no_grad():
                self._table_leaf = self._map_upstream().requires_grad_()
        return self._table_leaf

    def step_tables(self) -> list[torch.Tensor]:
        return [self.targets()]

    def finish_step(self, backward) -> None:
        """Push the step's accumulated table gradient through g_k: one backward per step."""
        leaf, self._table_leaf = self._table_leaf, None
        if leaf is not None and leaf.grad is not None:
            table = self._map_upstream()
            backward((table * leaf.grad.to(table.dtype)).sum())

    def _map_upstream(self) -> torch.Tensor:
        return self.g(self._upstream.to(self.g.up.weight.dtype))

    def table_drift(self) -> torch.Tensor:
        """||m_k - m_{k+1}|| / ||m_{k+1}||: how far g_k has moved this stage's targets away from
        the ones it receives (0 at initialisation) -- what the feedback network has learned."""
        if self._drift is None:  # once per step: it builds fp32 copies of two [V, H] tables
            upstream = self._upstream.float()
            self._drift = (self.targets().detach().float() - upstream).norm() / upstream.norm().clamp_min(1e-12)
        return self._drift

    @torch.no_grad()
    def publish(self) -> torch.Tensor:
        return self._map_upstream()


class _CrossEntropyReadout:
    """A readout that is a norm, a [V]-way product and fp32 cross-entropy per token, per head:

        z = norm(h)                  or, with dim=r, z = P_k norm(h), P_k [r, H] trained
        L = CE(z O^T, y)             O [V, r]: W_k (dgl), m_k (prototype), r(v) (drtp)
        with neg=n: L = CE(z O[C]^T + log w_C, y), C the micro-batch's shared candidates
                    (variant_options.py: the distinct targets and n sampled negatives)"""

    per_token_readout = True
    trained_operand = True  # the first head's [V, H] operand takes a gradient, so the product saves its input
    readout_heads = 1       # [V]-way products per token that share z and the candidates (the others trained)
    owns_projection = True  # with dim=r, P_k is the stage's own; False: it arrives in the message (critic.py)

    @classmethod
    def accepted_options(cls):
        return super().accepted_options() | {"dim", "neg"}

    @classmethod
    def sliceable(cls, options):
        # The candidates are shared by the micro-batch's tokens: a slice would draw its own.
        return super().sliceable(options) and not options.neg

    @classmethod
    def readout_candidates(cls, options, config, micro_batch_tokens: int | None = None) -> int:
        """C, the softmax's width: V, or with neg=n at most n + the micro-batch's tokens (its
        distinct targets, fewer in practice; the run logs the measured `readout_candidates`)."""
        negatives = options.neg
        if not negatives:
            return config.vocab_size
        return min(config.vocab_size, negatives + (micro_batch_tokens or config.max_position_embeddings))

    @classmethod
    def readout_flops_per_token(cls, options, config, micro_batch_tokens=None):
        """Per head: forward 2rC, grad of z 2rC, and (trained operand; every head after the
        first is) grad of the operand 2rC; with dim=r, P_k's forward and input gradient, 4Hr, once,
        and its weight gradient 2Hr where the stage owns it. Full readout: 6HV."""
        width = cls.readout_width(options, config)
        candidates = cls.readout_candidates(options, config, micro_batch_tokens)
        heads = (6.0 if cls.trained_operand else 4.0) + 6.0 * (cls.readout_heads - 1)
        reduce = (6.0 if cls.owns_projection else 4.0) * config.hidden_size * width if cls.reduces(options, config) else 0.0
        return reduce + heads * width * candidates

    @classmethod
    def _trained_heads(cls) -> bool:
        """Whether a head's operand takes a gradient (the first's where it is a weight or m_k, and
        every head after the first): then its product saves z, and a gather of its rows their ids."""
        return cls.trained_operand or cls.readout_heads > 1

    @classmethod
    def readout_saved_bytes_per_token(cls, options, config, dtype_bytes, norm_saved_bytes, micro_batch_tokens=None):
        """The norm's saved tensors and its output, which the next product saves when it takes a
        gradient: a trained head's, or the stage's own P_k (dim=r); with dim=r, z [r] where a
        trained head reads it; per head fp32 log-probabilities [C] and the int64 target. Where
        every operand is data (the critic's U_k and Q_k without context heads, drtp's r(v)),
        neither the norm's output nor z is saved. The operands are weights or tables, not
        activations."""
        reduces = cls.reduces(options, config)
        output_saved = cls._trained_heads() or (reduces and cls.owns_projection)
        unsaved_output = 0 if output_saved else dtype_bytes * config.hidden_size
        reduced = dtype_bytes * cls.readout_width(options, config) if reduces and cls._trained_heads() else 0
        candidates = cls.readout_candidates(options, config, micro_batch_tokens)
        return norm_saved_bytes - unsaved_output + reduced + cls.readout_heads * (FP32 * candidates + INT64)

    @classmethod
    def readout_saved_bytes_per_micro_batch(cls, options, config, dtype_bytes, micro_batch_tokens):
        """With neg=n: the gathered candidate rows O[C] [C, r], which each head's product saves
        (z takes a gradient), and the candidate ids the gather saves where a gathered operand is
        trained, at the declared bound of C."""
        if not options.neg:
            return 0
        candidates = cls.readout_candidates(options, config, micro_batch_tokens)
        ids = INT64 if cls._trained_heads() else 0
        return candidates * (cls.readout_heads * cls.readout_width(options, config) * dtype_bytes + ids)

    def _build_readout(self, config) -> None:
        """P_k when dim=r (a submodule named `reduce`), starting as R^T (variant_options.py);
        with neg=n the candidate sampler's seed and its count of draws so far."""
        width = self.readout_width(self.options, config)
        reduces = self.reduces(self.options, config) and self.owns_projection
        self.reduce = nn.Linear(config.hidden_size, width, bias=False) if reduces else None
        if self.reduce is not None and not self.reduce.weight.is_meta:
            with torch.no_grad():
                self.reduce.weight.copy_(fixed_projection(config.hidden_size, width).t())
        if self.options.neg:
            # Buffers, so that the checkpoint carries them: a resumed run draws what an
            # uninterrupted one would. The seed comes from the stage's seeded construction
            # (pipeline/build.py), so stages, and runs with other seeds, draw differently.
            seed = torch.randint(0, 2**62, (), dtype=torch.long)
            self.register_buffer("sample_seed", seed if not seed.is_meta else torch.zeros((), dtype=torch.long))
            self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def readout_operand(self) -> torch.Tensor:
        """O [V, r], what z is scored against: W_k (dgl), m_k (prototype)."""
        raise NotImplementedError

    def readout_terms(self) -> dict:
        """What the variant logs beside its cross-entropy."""
        return {}

    def local_loss(self, hidden, labels):
        ce, terms, _ = self.next_token_loss(hidden, labels)
        return ce, terms

    def next_token_loss(self, hidden, labels):
        """-log q_k(y_t | h) averaged over the tokens, its terms, and (z, candidates) for
        variants that score more targets on the same z (context.py)."""
        candidates = self.draw_candidates(labels)
        z = self.readout_input(hidden)
        ce = self.readout_cross_entropy(z, self.readout_operand(), labels, candidates).mean()
        return ce, {"ce": ce.detach(), **self.readout_terms(), **self.candidate_terms(candidates)}, (z, candidates)

    def readout_input(self, hidden):
        normed = self.norm(hidden)
        return self.reduce(normed) if self.reduce is not None else normed

    def draw_candidates(self, labels):
        """This micro-batch's shared candidates (None: the full softmax), from a generator of the
        block's own seeded by (sample_seed, draws): independent of whatever else consumes random
        numbers on the stage, so the launched and the emulated pipelines draw alike."""
        if not self.options.neg:
            return None
        generator = torch.Generator().manual_seed(int(self.sample_seed) + 1_000_003 * int(self.draws))
        self.draws += 1
        return shared_candidates(labels, self.vocab_size, self.options.neg, generator)

    @staticmethod
    def readout_cross_entropy(z, operand, labels, candidates):
        """Per-token -log q(y | z), q = softmax(z operand^T) over the vocabulary or the candidates."""
        targets = labels if candidates is None else candidates.position(labels)
        return delta_categorical_agreement(readout_logits(z, operand, candidates), targets)

    @staticmethod
    def candidate_terms(candidates) -> dict:
        return {} if candidates is None else {"readout_candidates": torch.tensor(float(len(candidates)))}


@register
class PrototypeFeedback(_CrossEntropyReadout, TableFeedback):
    """q_k(y | h) = softmax_v(<norm(h), m_k(v)>), m_k = g_k(m_{k+1}); the default until dgl-context."""

    name = "prototype"

    def __init__(self, config, options):
        super().__init__(config, options)
        self._build_readout(config)

    def readout_operand(self):
        return self.targets()

    def readout_terms(self):
        return {"table_drift": self.table_drift()}


class _AgreementFeedback(TableFeedback):
    """Per-token target messages nu_k(y_t) = m_k[y_t]; forward message P norm(h_k). The collapse
    guard takes statistics over all tokens of the micro-batch, so the readout is not sliced."""

    @classmethod
    def accepted_options(cls):
        return super().accepted_options() | {"guard"}

    @classmethod
    def readout_flops_per_token(cls, options, config, micro_batch_tokens=None):
        """Forward message P norm(h), P [H, H] trained: 6H^2; the collapse guard's covariance over
        the micro-batch's tokens, centred^T centred [H, N] @ [N, H]: 2H^2 per token forward, 4H^2
        backward. The target rows m_k[y_t] are a gather (0). Total 12H^2."""
        return 12.0 * config.hidden_size ** 2

    @classmethod
    def readout_flops_per_micro_batch(cls, options, config):
        """The collapse guard on the whole target table, covariance [H, V] @ [V, H], forward 2VH^2
        and backward 4VH^2, which `local_loss` recomputes for every micro-batch."""
        return 6.0 * config.vocab_size * config.hidden_size ** 2

    def __init__(self, config: PretrainedConfig, options: VariantOptions):
        super().__init__(config, options)
        width = config.hidden_size
        self.project = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.project.weight)
        self.guard_weight = options.guard

    def local_loss(self, hidden, labels):
        forward_msg = self.project(self.norm(hidden)).float()
        table = self.targets()
        target_msg = table[labels].float()
        agreement = self.agreement(forward_msg, target_msg).mean()
        # Both messages are held apart from a constant -- the table over the vocabulary, the
        # forward message over this micro-batch's tokens (VICReg guards both branches) -- through
        # their mean parameters E[z], which is where a constant message shows (saturated
        # Bernoulli logits can vary widely while every p is 1).
        table_mean = self.mean_parameter(table.float())
        out_mean = self.mean_parameter(forward_msg.reshape(-1, forward_msg.shape[-1]))
        spread, decorrelation = collapse_guard(table_mean, self.min_std)
        out_spread, out_decorrelation = collapse_guard(out_mean, self.min_std)
        guard = spread + decorrelation + out_spread + out_decorrelation
        loss = agreement + self.guard_weight * guard
        return loss, {"agreement": agreement.detach(), "guard_spread": spread.detach(),
                      "guard_decorrelation": decorrelation.detach(), "guard_out_spread": out_spread.detach(),
                      "guard_out_decorrelation": out_decorrelation.detach(),
                      "table_std": table_mean.detach().std(0).mean(), "table_drift": self.table_drift(),
                      "output_std": out_mean.detach().std(0).mean()}


@register
class GaussianFeedback(_AgreementFeedback):
    """Unit variances s_a^2, s_b^2: fixed at 1/2 each, or learned (log-parametrised)."""

    name = "gaussian"

    @classmethod
    def accepted_options(cls):
        return super().accepted_options() | {"variance"}

    def __init__(self, config, options):
        super().__init__(config, options)
        start = torch.full((config.hidden_size,), 0.5).log()
        learned = options.variance == "learned"
        self.log_var_a = nn.Parameter(start.clone(), requires_grad=learned)
        self.log_var_b = nn.Parameter(start.clone(), requires_grad=learned)

    min_std = 1.0  # of the means mu, nu: the scale of norm(h), whose units have unit RMS

    def mean_parameter(self, msg):
        return msg

    def agreement(self, mu, nu):
        return gaussian_agreement(mu, nu, self.log_var_a.float().exp(), self.log_var_b.float().exp())


@register
class BernoulliFeedback(_AgreementFeedback):
    name = "bernoulli"
    min_std = 0.25  # of p = sigmoid(logit): a unit that is on with p=0.9 for half the tokens and 0.1 otherwise has 0.4

    def mean_parameter(self, msg):
        return torch.sigmoid(msg)

    def agreement(self, logit_a, logit_b):
        return bernoulli_agreement(logit_a, logit_b)


@register
class LocalHeadFeedback(_CrossEntropyReadout, StageFeedback):
    """DGL special case: a free local readout W_k, no feedback from later stages."""

    name = "dgl"

    def __init__(self, config: PretrainedConfig, options: VariantOptions):
        super().__init__(config, options)
        self._build_readout(config)
        self.head = nn.Linear(self.readout_width(options, config), config.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=config.initializer_range)

    def readout_operand(self):
        return self.head.weight


@register
class RandomFeedback(_CrossEntropyReadout, StageFeedback):
    """Direct-random-target-projection special case: fixed random prototypes r(v), never trained."""

    name = "drtp"
    trained_operand = False  # a buffer: the product needs no gradient for it, nor saves its input

    @classmethod
    def accepted_options(cls):
        return frozenset()  # its fixed random prototypes are a full [V, H] buffer; no options

    def __init__(self, config: PretrainedConfig, options: VariantOptions):
        super().__init__(config, options)
        table = torch.randn(config.vocab_size, config.hidden_size) * config.hidden_size ** -0.5
        self.register_buffer("table", table)

    def local_loss(self, hidden, labels):
        ce = delta_categorical_agreement(self.norm(hidden) @ self.table.to(hidden.dtype).t(), labels).mean()
        return ce, {"ce": ce.detach()}


def collapse_guard(rows: torch.Tensor, min_std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg-style terms over the first axis of an [N, d] set of messages:
    spread = mean_j relu(min_std - std_j); decorrelation = sum_{i != j} Cov_ij^2 / d."""
    centred = rows - rows.mean(0, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(0) + 1e-4)
    spread = F.relu(min_std - std).mean()
    cov = centred.t() @ centred / max(rows.shape[0] - 1, 1)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    decorrelation = off_diagonal.pow(2).sum() / rows.shape[1]
    return spread, decorrelation


def build_feedback(variant: str, config: PretrainedConfig) -> StageFeedback:
    """The feedback block of `variant`, a registered name with its options ("gaussian:guard=0.5")."""
    return get_variant(variant).build(config)
