"""The feedback network: one feedback block per pipeline stage, with its own weights.

Stage k < S-1 owns one block. It turns the target side of the problem into block k's local loss
(bll_ds/bll/messages.py gives the loss families):

    variant     backward message beta_k                              local loss L_k (per token)
    ---------   --------------------------------------------------   -----------------------------------------
    prototype   q_k(y | z) = softmax_v(<norm(z), m_k(v)>)             -log q_k(y_t | h_k)           (default)
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

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bll_ds.bll.variants import VARIANTS
from bll_ds.bll.messages import bernoulli_agreement, delta_categorical_agreement, gaussian_agreement



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
    """Base class. Per optimizer step: `prepare(upstream_table)`, then `local_loss` per
    micro-batch, then `finish_step`, then (after the optimizer step) `publish()`."""

    needs_table = False

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

    needs_table = True

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


class PrototypeFeedback(TableFeedback):
    def local_loss(self, hidden, labels):
        logits = self.norm(hidden) @ self.targets().t()
        ce = delta_categorical_agreement(logits, labels).mean()
        return ce, {"ce": ce.detach(), "table_drift": self.table_drift()}


class _AgreementFeedback(TableFeedback):
    """Per-token target messages nu_k(y_t) = m_k[y_t]; forward message P norm(h_k)."""

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


class GaussianFeedback(_AgreementFeedback):
    """Unit variances s_a^2, s_b^2: fixed at 1/2 each, or learned (log-parametrised)."""

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


class BernoulliFeedback(_AgreementFeedback):
    min_std = 0.25  # of p = sigmoid(logit): a unit that is on with p=0.9 for half the tokens and 0.1 otherwise has 0.4

    def mean_parameter(self, msg):
        return torch.sigmoid(msg)

    def agreement(self, logit_a, logit_b):
        return bernoulli_agreement(logit_a, logit_b)


class LocalHeadFeedback(StageFeedback):
    """DGL special case: a free local readout W_k, no feedback from later stages."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        nn.init.normal_(self.head.weight, std=config.initializer_range)

    def local_loss(self, hidden, labels):
        ce = delta_categorical_agreement(self.head(self.norm(hidden)), labels).mean()
        return ce, {"ce": ce.detach()}


class RandomFeedback(StageFeedback):
    """Direct-random-target-projection special case: fixed random prototypes r(v), never trained."""

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
    if variant == "prototype":
        return PrototypeFeedback(config)
    if variant == "gaussian":
        return GaussianFeedback(config, guard_weight, learn_variance)
    if variant == "bernoulli":
        return BernoulliFeedback(config, guard_weight)
    if variant == "dgl":
        return LocalHeadFeedback(config)
    if variant == "drtp":
        return RandomFeedback(config)
    raise ValueError(f"unknown BLL variant {variant!r}; choose one of {VARIANTS}")
