"""The feedback network: one feedback block per pipeline stage, with its own weights.

Stage k < S-1 owns one block. It turns the target side of the problem into block k's local loss
(bll_ds/bll/messages.py gives the loss families; the default, dgl-context, is dgl plus the
reconstruction terms of bll_ds/bll/context.py):

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

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bll_ds.bll.messages import bernoulli_agreement, delta_categorical_agreement, gaussian_agreement
from bll_ds.bll.variants import get as get_variant
from bll_ds.bll.variants import register

if TYPE_CHECKING:
    from bll_ds.config import BLLConfig

FP32, INT64 = 4, 8

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
    `local_loss` per micro-batch, then `finish_step`, then (after the optimizer step) `publish()`
    (bll_ds/bll/stage_step.py runs them in that order).

    A variant declares its facts here, for the engine builder, the memory planner
    (bll_ds/bench/memory.py) and the FLOPs model (bll_ds/measure/flops.py)."""

    name: ClassVar[str] = ""
    sends_table: ClassVar[bool] = False        # its target table m_k travels upstream once per step
    per_token_readout: ClassVar[bool] = False  # the loss is a token mean of per-token terms: sliceable

    @classmethod
    def build(cls, config: PretrainedConfig, options: "BLLConfig | None" = None) -> "StageFeedback":
        """The block for one stage; `options` is the run's BLL config section (--bll_* flags)."""
        return cls(config)

    @classmethod
    def readout_flops_per_token(cls, config: PretrainedConfig) -> float:
        """Training FLOPs per token (forward + backward) of the local loss, beyond the stage's blocks."""
        raise NotImplementedError(f"BLL variant {cls.name!r} declares no readout FLOPs")

    @classmethod
    def readout_flops_per_micro_batch(cls, config: PretrainedConfig) -> float:
        """Training FLOPs per micro-batch that do not scale with its tokens."""
        return 0.0

    @classmethod
    def step_flops(cls, config: PretrainedConfig) -> float:
        """Training FLOPs once per optimizer step (the feedback network's own update)."""
        return 0.0

    @classmethod
    def trainable_matrix_parameters(cls, config: PretrainedConfig) -> int:
        """Trainable weights of rank >= 2 (biases and norm gains, well under 1%, left out), counted
        on the meta device: what the optimizer-step cost model charges the block."""
        with torch.device("meta"):
            block = cls.build(config)
        return sum(p.numel() for p in block.parameters() if p.requires_grad and p.dim() >= 2)

    @classmethod
    def message_shape(cls, config: PretrainedConfig) -> tuple[int, ...] | None:
        """The one tensor stage k+1 sends to stage k once per optimizer step (None: nothing).
        The engine's channel (engine/feedback_channel.py) carries exactly this shape."""
        return (config.vocab_size, config.hidden_size) if cls.sends_table else None

    @classmethod
    def compose_message(cls, table: torch.Tensor | None, stage_layers) -> torch.Tensor | None:
        """Built on the sending stage k+1 after its optimizer step: its table (m_{k+1}, or W_out on
        the last stage). `stage_layers` are its forward layers, for variants that send more than
        the table (bll_ds/bll/overlap.py); `prepare` on stage k receives the result."""
        return table

    @classmethod
    def table_bytes_per_step(cls, config: PretrainedConfig, dtype_bytes: int) -> int:
        """Bytes this variant sends upstream per optimizer step (its message, or nothing)."""
        shape = cls.message_shape(config)
        return math.prod(shape) * dtype_bytes if shape is not None else 0

    @classmethod
    def readout_saved_bytes_per_token(cls, config: PretrainedConfig, dtype_bytes: int,
                                      norm_saved_bytes: int) -> int | None:
        """Bytes autograd saves per token for the local readout, given what its norm saves
        (model-family specific: the planner passes it). None: not modelled by the planner."""
        return None

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.norm = readout_norm(config)
        self.vocab_size = config.vocab_size
        self._table_leaf = None  # m_k as read by the micro-batches; accumulates dL/dm_k
        self._upstream = None
        self._drift = None       # table_drift of this step, computed once

    def prepare(self, upstream_table: torch.Tensor | None) -> None:
        self._upstream = upstream_table
        self._table_leaf = self._drift = None

    def local_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def finish_step(self, backward) -> None:
        """Once per step, after the micro-batches: train the feedback network (variants without
        one have nothing to do)."""

    @torch.no_grad()
    def publish(self) -> torch.Tensor | None:
        """The table this stage sends upstream after its optimizer step (None: it sends nothing)."""
        return None


class TableFeedback(StageFeedback):
    """Variants whose targets come from the upstream table through g_k."""

    sends_table = True

    @classmethod
    def step_flops(cls, config: PretrainedConfig) -> float:
        """g_k (TableMap, H -> Hg -> H, Hg = H as built) applied to the V x H table, per step:

        targets()     g_k forward once per step, without a graph                2 products: 4 V H Hg
        finish_step   g_k forward again (recomputed rather than held) and its
                      backward: `down` grad of input and weight, `up` grad of
                      weight only (the upstream table is detached)              5 products: 10 V H Hg
        publish()     g_k forward after the optimizer step                      2 products: 4 V H Hg
        """
        return 18.0 * config.vocab_size * config.hidden_size * config.hidden_size

    def __init__(self, config: PretrainedConfig, hidden: int | None = None):
        super().__init__(config)
        self.g = TableMap(config.hidden_size, hidden or config.hidden_size)

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
    """Facts of a readout that is a norm, a [V]-way product and fp32 cross-entropy per token."""

    per_token_readout = True
    trained_operand = True  # the [V, H] operand takes a gradient, so the product saves its normed input

    @classmethod
    def readout_flops_per_token(cls, config):
        """forward 2HV, grad of h 2HV, and (trained operand) grad of the operand 2HV."""
        return (6.0 if cls.trained_operand else 4.0) * config.hidden_size * config.vocab_size

    @classmethod
    def readout_saved_bytes_per_token(cls, config, dtype_bytes, norm_saved_bytes):
        """The norm's saved tensors and its output (which the product saves when its operand
        takes a gradient), fp32 log-probabilities [V] and the int64 target; the operand itself is
        a weight or a table, not an activation."""
        unsaved_output = 0 if cls.trained_operand else dtype_bytes * config.hidden_size
        return norm_saved_bytes - unsaved_output + FP32 * config.vocab_size + INT64


@register
class PrototypeFeedback(_CrossEntropyReadout, TableFeedback):
    """q_k(y | h) = softmax_v(<norm(h), m_k(v)>), m_k = g_k(m_{k+1}); the default until issue 11."""

    name = "prototype"

    def local_loss(self, hidden, labels):
        logits = self.norm(hidden) @ self.targets().t()
        ce = delta_categorical_agreement(logits, labels).mean()
        return ce, {"ce": ce.detach(), "table_drift": self.table_drift()}


class _AgreementFeedback(TableFeedback):
    """Per-token target messages nu_k(y_t) = m_k[y_t]; forward message P norm(h_k). The collapse
    guard takes statistics over all tokens of the micro-batch, so the readout is not sliced."""

    @classmethod
    def build(cls, config, options=None):
        guard_weight = options.guard_weight if options is not None else 1.0
        return cls(config, guard_weight)

    @classmethod
    def readout_flops_per_token(cls, config):
        """Forward message P norm(h), P [H, H] trained: 6H^2; the collapse guard's covariance over
        the micro-batch's tokens, centred^T centred [H, N] @ [N, H]: 2H^2 per token forward, 4H^2
        backward. The target rows m_k[y_t] are a gather (0). Total 12H^2."""
        return 12.0 * config.hidden_size ** 2

    @classmethod
    def readout_flops_per_micro_batch(cls, config):
        """The collapse guard on the whole target table, covariance [H, V] @ [V, H], forward 2VH^2
        and backward 4VH^2, which `local_loss` recomputes for every micro-batch."""
        return 6.0 * config.vocab_size * config.hidden_size ** 2

    def __init__(self, config: PretrainedConfig, guard_weight: float, hidden: int | None = None):
        super().__init__(config, hidden)
        width = config.hidden_size
        self.project = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.project.weight)
        self.guard_weight = guard_weight

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
    def build(cls, config, options=None):
        if options is None:
            return cls(config, 1.0)
        return cls(config, options.guard_weight, options.learn_variance)

    def __init__(self, config, guard_weight, learn_variance: bool = False, hidden=None):
        super().__init__(config, guard_weight, hidden)
        start = torch.full((config.hidden_size,), 0.5).log()
        self.log_var_a = nn.Parameter(start.clone(), requires_grad=learn_variance)
        self.log_var_b = nn.Parameter(start.clone(), requires_grad=learn_variance)

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

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=config.initializer_range)

    def local_loss(self, hidden, labels):
        ce = delta_categorical_agreement(self.head(self.norm(hidden)), labels).mean()
        return ce, {"ce": ce.detach()}


@register
class RandomFeedback(_CrossEntropyReadout, StageFeedback):
    """Direct-random-target-projection special case: fixed random prototypes r(v), never trained."""

    name = "drtp"
    trained_operand = False  # a buffer: the product needs no gradient for it, nor saves its input

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
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


def build_feedback(variant: str, config: PretrainedConfig, guard_weight: float = 1.0,
                   learn_variance: bool = False) -> StageFeedback:
    """The feedback block of `variant` (a registered name) with these options."""
    from bll_ds.config import BLLConfig  # the config module imports the registry, not this file

    return get_variant(variant).build(config, BLLConfig(variant=variant, guard_weight=guard_weight,
                                                        learn_variance=learn_variance))
