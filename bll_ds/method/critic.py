"""Downstream-trained feedback: beta_k estimated on the stage that knows it.

In the paper the backward message at block k is beta_k(z) = p(y | z_k): what the rest of the
network predicts from z_k. Stage k cannot compute it without the later blocks, but stage k+1 sees
both sides every micro-batch: it receives h_k as its input and makes its own prediction from it.
So stage k+1 owns a critic C_k of its input and trains it there; the critic travels upstream as
stage k's message, once per step, under the tables' lag rule (pipeline/feedback_channel.py):

    on stage k+1 (every stage but the first, the last included):
        q_{k+1}   = softmax(stage k+1's prediction from h_k)    last stage: the LM head's output;
                                                                 elsewhere: its own local readout
        t         = (1 - a) q_{k+1} + a onehot(y)               a = the `labels=` option (0.5)
        C_k      <- argmin  E_t[-log softmax(C_k norm_c(h_k))]  = KL(t || beta_k) + const;
                                                                 h_k and q_{k+1} detached: the critic's
                                                                 loss trains C_k and norm_c only
        send C_k upstream after the optimizer step              [V, H], counted in bytes_up
    on stage k:
        beta_k(y | h_k) = softmax(norm(h_k) C_k^T)               C_k as received (lagged, no gradient)
        L_k             = -log beta_k(y_t | h_k)                 (with -context: + the reconstruction
                                                                  terms of context.py)

The last stage's prediction is the model's output distribution, so C_{S-2} is distilled from the
real head through the last block; each earlier critic from the stage after it, whose readout is
its own received critic. No gradient crosses a boundary: stage k+1's critic loss sees h_k as data,
and stage k sees C_k as data. The critic is not a copy of forward weights: it is stage k+1's own
parameter, trained by stage k+1's optimizer and checkpointed with its block.

With the -man readout (`critic-man`, `critic-context-man`) stage k reads h_k through Dbar_k, the
averaged copy of stage k+1's first decoder layer (next_layer_average.py), and stage k+1 trains C_k
on that layer's output instead of on h_k (one more forward of the layer, without a graph).

The first stage's input is token ids, so it holds no critic; the last stage, which otherwise
holds no feedback block, holds one for its critic (`trains_input_critic`, variants.Variant
`holds_block`).

Options (variant_options.py), for real vocabularies. dim=r: the critic is factored, C_k = U_k Q_k
with U_k [V, r] and Q_k [r, H], both trained on stage k+1 (Q_k starts as the fixed projection R^T);
the message is the [V + H, r] stack of U_k and Q_k^T, and stage k reads z = Q_k norm(h_k) and
scores it against U_k, both as data. Its context heads, [V, r], are its own and read h_k through its
own P_k (a stage's projection, as dgl-context:dim=r's): through Q_k they could keep only what stage
k+1 predicts the next token from. neg=n: stage k's
readout is the shared-candidate softmax of variant_options.py, and stage k+1 trains C_k on the
same candidates: the target and the critic are both scored over the candidates of the
micro-batch, with the sampling correction (the last stage draws its own from its labels).
table= and refresh= act on the message as on a target table. labels=a sets the labels' share of
the critic's target (0.5 by default; a = 0 is the paper's message as the later blocks predict
it, a = 1 a head trained on the labels by the next stage). extrap=lam: stage k reads the critic
extrapolated over its lag, C^(t-2) + lam (C^(t-2) - C^(t-3)), instead of C^(t-2) as received
(message_extrapolation.py; one add per step, two messages held).

Cost on every stage but the first: the critic's forward, its weight gradient and the input
gradient its norm's gain needs, 6 r C per token (6 H V in full; with dim=r also Q_k's 6 H r), its
weights with their optimizer state, and one message per step ([V, H], or [V + H, r]). The
readout on stage k against the received critic: forward and input gradient, 4 r C per token, and
with dim=r Q_k's 4 H r (the operands are data, as drtp's), plus P_k's 6 H r under the context heads. The FLOPs model and the simulator
charge both; the memory planner counts the critic's saved tensors on every stage but the
first (input_critic_saved_bytes_per_token) beside the readout's, its parameters and its message.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bll_ds.method.context import _ContextTerms
from bll_ds.method.feedback import BOOL, FP32, INT64, StageFeedback, _CrossEntropyReadout, readout_norm
from bll_ds.method.message_extrapolation import FLOPS_PER_ENTRY, HELD_MESSAGES, MessageExtrapolation
from bll_ds.method.messages import delta_categorical_agreement
from bll_ds.method.variant_options import TABLE_DTYPES, Candidates, fixed_projection, readout_logits
from bll_ds.method.next_layer_average import AveragedNextLayer
from bll_ds.method.variants import register, register_composed

IGNORE = -100


class InputCritic(nn.Module):
    """C_k with its own normalisation, held by stage k+1: logits = U_k Q_k norm_c(h_k), Q_k only with dim=r
    (else U_k is [V, H] and there is no projection)."""

    def __init__(self, config, options):
        super().__init__()
        width = StageFeedback.readout_width(options, config)
        self.norm = readout_norm(config)
        self.project = (nn.Linear(config.hidden_size, width, bias=False) if StageFeedback.reduces(options, config)
                        else None)
        self.weight = nn.Parameter(torch.empty(config.vocab_size, width))
        nn.init.normal_(self.weight, std=config.initializer_range)
        if self.project is not None and not self.project.weight.is_meta:
            with torch.no_grad():
                self.project.weight.copy_(fixed_projection(config.hidden_size, width).t())

    def forward(self, stage_input: torch.Tensor, candidates: Candidates | None = None) -> torch.Tensor:
        """Logits over the vocabulary, or over `candidates` with their sampling correction."""
        z = self.norm(stage_input.detach())
        if self.project is not None:
            z = self.project(z)
        return readout_logits(z, self.weight, candidates)

    @torch.no_grad()
    def message(self) -> torch.Tensor:
        """U_k [V, H]; with dim=r the stack [U_k; Q_k^T], [V + H, r]."""
        if self.project is None:
            return self.weight.detach()
        return torch.cat([self.weight.detach(), self.project.weight.detach().t()])


def critic_loss(logits: torch.Tensor, prediction: torch.Tensor, labels: torch.Tensor,
                label_weight: float) -> tuple[torch.Tensor, dict]:
    """Mean over the labelled tokens of -sum_v t(v) log softmax(logits)(v), t = (1 - a) softmax(prediction)
    + a onehot(y). Terms: the critic's own next-token cross-entropy, and KL(q_{k+1} || critic), how
    closely it follows the stage's prediction. With neg=n, `logits` and `prediction` are both over
    the micro-batch's candidates (sampling correction included) and `labels` are candidate positions."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    target = F.softmax(prediction.detach().float(), dim=-1)
    valid = labels != IGNORE
    hard = -log_q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    soft = -(target * log_q).sum(-1)
    count = valid.sum().clamp_min(1)
    per_token = (1.0 - label_weight) * soft + label_weight * hard
    loss = (per_token * valid).sum() / count
    with torch.no_grad():
        entropy = -(target * target.clamp_min(1e-30).log()).sum(-1)
        kl = ((soft - entropy) * valid).sum() / count
        ce = (hard * valid).sum() / count
    return loss, {"critic_ce": ce, "critic_kl": kl}


class _OwnsInputCritic:
    """A block that holds C_{k-1}, the critic of its stage's input: its loss and its message."""

    @property
    def label_weight(self) -> float:
        """a, the labels' share of the critic's target (the `labels=` option)."""
        return self.options.labels

    def attach_input_critic(self) -> None:
        self.critic = InputCritic(self.config, self.options)

    def input_critic_loss(self, features: torch.Tensor, labels: torch.Tensor,
                          prediction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The critic's loss on this micro-batch. `features`: what it reads (Variant.critic_features);
        `prediction`: the stage's over the whole vocabulary (the last stage's LM logits), else the
        local readout's from this micro-batch's `loss`, over its candidates."""
        if prediction is None:
            prediction, candidates = self.prediction
        else:
            candidates = self.draw_candidates(labels)
            if candidates is not None:
                prediction = candidates.restrict(prediction)
        self.prediction = None
        targets = labels if candidates is None else candidates.position(labels)
        return critic_loss(self.critic(features, candidates), prediction, targets, self.label_weight)

    @torch.no_grad()
    def publish(self) -> torch.Tensor | None:
        return self.critic.message() if self.critic is not None else None


class LastStageCritic(_OwnsInputCritic, _CrossEntropyReadout, StageFeedback):
    """The last stage's block under a critic variant: C_{S-2} and nothing else (its own loss is the
    model's LM loss, whose logits are the critic's target). With neg=n it draws the critic's
    candidates from the labels, as the readouts upstream do."""

    owns_projection = False

    def __init__(self, config, options):
        super().__init__(config, options)
        self.norm = None  # no readout of its own
        self._build_readout(config)
        self.attach_input_critic()


@register
class CriticFeedback(_OwnsInputCritic, _CrossEntropyReadout, StageFeedback):
    """L_k = -log softmax(norm(h_k) C_k^T)(y_t), C_k trained by stage k+1 (module docstring)."""

    name = "critic"
    sends_table = True            # the critic C_k: [V, H], or [V + H, r] with dim=r
    trains_input_critic = True
    trained_operand = False       # the received critic is data on stage k
    owns_projection = False       # with dim=r, Q_k arrives with U_k
    per_token_readout = False     # the critic trains on the stage's whole micro-batch with its input

    @classmethod
    def accepted_options(cls):
        return super().accepted_options() | {"table", "refresh", "labels", "extrap"}

    @classmethod
    def message_shape(cls, options, config):
        width = cls.readout_width(options, config)
        return (config.vocab_size + (config.hidden_size if cls.reduces(options, config) else 0), width)

    @classmethod
    def step_flops(cls, options, config) -> float:
        """With extrap=lam, C_hat's subtraction, scaling and addition over the message, once per step."""
        return FLOPS_PER_ENTRY * math.prod(cls.message_shape(options, config)) if options.extrap else 0.0

    @classmethod
    def held_messages(cls, options) -> int:
        """With extrap=lam, the previous message and C_hat."""
        return HELD_MESSAGES if options.extrap else 0

    @classmethod
    def input_critic_flops_per_token(cls, options, config) -> float:
        """Forward 2rC, the weight gradient 2rC and the input gradient 2rC that the norm's gain
        needs (its input is detached); with dim=r the same three for Q_k, 6Hr."""
        width = cls.readout_width(options, config)
        candidates = cls.readout_candidates(options, config)
        project = 6.0 * config.hidden_size * width if cls.reduces(options, config) else 0.0
        return 6.0 * width * candidates + project

    @classmethod
    def input_critic_parameters(cls, options, config) -> int:
        """U_k [V, r] and, with dim=r, Q_k [r, H]."""
        width = cls.readout_width(options, config)
        return config.vocab_size * width + (config.hidden_size * width if cls.reduces(options, config) else 0)

    @classmethod
    def readout_saved_bytes_per_micro_batch(cls, options, config, dtype_bytes, micro_batch_tokens):
        """The generic count, plus, where table= makes the message travel in another dtype than
        the run's, the copies in the run's dtype that the readout's products save: Q_k [H, r]
        with dim=r, U_k [V, r] unless neg=n gathers its rows. (In the run's own dtype they are
        views of the received message, counted with the tables: bll_bench/memory.py.)"""
        generic = super().readout_saved_bytes_per_micro_batch(options, config, dtype_bytes, micro_batch_tokens)
        travels = TABLE_DTYPES.get(options.table)
        if travels is None or travels.itemsize == dtype_bytes:
            return generic
        rows = (0 if options.neg else config.vocab_size) + (config.hidden_size if cls.reduces(options, config) else 0)
        return generic + rows * cls.readout_width(options, config) * dtype_bytes

    @classmethod
    def input_critic_saved_bytes_per_token(cls, options, config, dtype_bytes, norm_saved_bytes,
                                           micro_batch_tokens=None):
        """norm_c's (its input is the stage's, detached: the norm saves only what its gain needs,
        and its output, which the next product saves), with dim=r z = Q_k norm_c(h) [r]; the fp32
        log-probabilities and the fp32 target [C] (the soft term's product saves it), the int64
        label and the bool mask of labelled tokens."""
        reduced = dtype_bytes * cls.readout_width(options, config) if cls.reduces(options, config) else 0
        candidates = cls.readout_candidates(options, config, micro_batch_tokens)
        return norm_saved_bytes + reduced + 2 * FP32 * candidates + INT64 + BOOL

    @classmethod
    def input_critic_saved_bytes_per_micro_batch(cls, options, config, dtype_bytes, micro_batch_tokens, last):
        """The int64 count of labelled tokens the mean divides by; with neg=n the gathered rows
        U_k[C] [C, r] and their ids (U_k is trained), at the declared bound of C. The ids are the
        readout's own candidates' on the other stages, saved once where the readout's gather
        saves them too; the last stage draws its own."""
        if not options.neg:
            return INT64
        candidates = cls.readout_candidates(options, config, micro_batch_tokens)
        ids = 0 if not last and cls._trained_heads() else INT64
        return INT64 + candidates * (cls.readout_width(options, config) * dtype_bytes + ids)

    @classmethod
    def last_stage_block(cls, config, options) -> StageFeedback:
        return LastStageCritic(config, options)

    def __init__(self, config, options):
        super().__init__(config, options)
        self._build_readout(config)
        self.prediction = None  # this micro-batch's local readout logits and candidates: the target downstream
        # holds the previous message, checkpointed as this module's extra state
        self.extrapolation = MessageExtrapolation(options.extrap) if options.extrap else None

    def prepare(self, upstream_table):
        if self.extrapolation is not None and upstream_table is not None:
            upstream_table = self.extrapolation(upstream_table)
        super().prepare(upstream_table)

    def step_tables(self) -> list[torch.Tensor]:
        """With extrap=lam, C_hat: computed once per step, read by every micro-batch's readout."""
        return [self._upstream] if self.extrapolation is not None and self._upstream is not None else []

    def _received(self) -> torch.Tensor:
        if self._upstream is None:
            raise RuntimeError("prepare() must be given the downstream stage's critic before local_loss()")
        return self._upstream

    def readout_operand(self) -> torch.Tensor:
        """U_k, the received critic's first V rows."""
        return self._received()[:self.vocab_size]

    @classmethod
    def readout_flops_per_token(cls, options, config, micro_batch_tokens=None):
        """The generic count, plus, where the context heads read through the stage's own P_k
        (owns_projection), the received Q_k's forward and input gradient, 4 H r."""
        flops = super().readout_flops_per_token(options, config, micro_batch_tokens)
        if cls.owns_projection and cls.reduces(options, config):
            flops += 4.0 * config.hidden_size * cls.readout_width(options, config)
        return flops

    def next_token_loss(self, hidden, labels):
        """The critic's readout of z = Q_k norm(h); returns, for the context heads, the stage's own
        reading of h: P_k norm(h) where it owns one (dim=r), else norm(h)."""
        candidates = self.draw_candidates(labels)
        normed = self.norm(hidden)
        z = normed @ self._received()[self.vocab_size:].to(normed.dtype) if self.reduces(self.options, self.config) \
            else normed
        logits = readout_logits(z, self.readout_operand().to(z.dtype), candidates)
        targets = labels if candidates is None else candidates.position(labels)
        self.prediction = (logits.detach(), candidates)
        ce = delta_categorical_agreement(logits, targets).mean()
        own = self.reduce(normed) if self.reduce is not None else z
        return ce, {"ce": ce.detach(), **self.candidate_terms(candidates)}, (own, candidates)


@register
class ContextCriticFeedback(_ContextTerms, CriticFeedback):
    """The critic's readout plus the reconstruction heads of context.py. With dim=r the heads read
    h_k through P_k, the stage's own projection, not through the received Q_k: Q_k spans what
    stage k+1 predicts the next token from, and the preceding tokens, which the heads keep in h_k,
    are what a next-token critic leaves out."""

    name = "critic-context"
    owns_projection = True


# The critic behind the -man readout (next_layer_average.py): stage k reads h_k through Dbar_k, the
# average of stage k+1's first decoder layer, and scores it against C_k, which stage k+1 trains
# on that layer's output (Variant.critic_features): the critic and the copy describe the same
# point of the network. The message is the critic, then the layer copy.
register_composed("critic-man", CriticFeedback, AveragedNextLayer)
register_composed("critic-context-man", ContextCriticFeedback, AveragedNextLayer)
