"""Downstream-trained feedback: beta_k estimated on the stage that knows it.

In the paper the backward message at block k is beta_k(z) = p(y | z_k): what the rest of the
network predicts from z_k. Stage k cannot compute it without the later blocks, but stage k+1 sees
both sides every micro-batch: it receives h_k as its input and makes its own prediction from it.
So stage k+1 owns a critic C_k of its input and trains it there; the critic travels upstream as
stage k's message, once per step, under the tables' lag rule (pipeline/feedback_channel.py):

    on stage k+1 (every stage but the first, the last included):
        q_{k+1}   = softmax(stage k+1's prediction from h_k)    last stage: the LM head's output;
                                                                 elsewhere: its own local readout
        t         = (1 - a) q_{k+1} + a onehot(y)               a = `label_weight`
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

Cost on every stage but the first: the critic's forward 2 H V and its weight gradient 2 H V per
token (its input takes none), its [V, H] weights with their optimizer state, and one [V, H]
message per step. The readout on stage k against the received C_k: forward and input gradient,
4 H V per token (the operand is data, as drtp's). The FLOPs model and the simulator charge both;
the memory planner does not model the critic yet (readout_saved_bytes_per_token is None).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bll_ds.method.context import _ContextTerms
from bll_ds.method.feedback import StageFeedback, _CrossEntropyReadout, readout_norm
from bll_ds.method.messages import delta_categorical_agreement
from bll_ds.method.next_layer_average import AveragedNextLayer
from bll_ds.method.variants import register, register_composed

IGNORE = -100


class InputCritic(nn.Module):
    """C_k with its own normalisation, held by stage k+1: logits = C_k norm_c(h_k)."""

    def __init__(self, config):
        super().__init__()
        self.norm = readout_norm(config)
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)

    def forward(self, stage_input: torch.Tensor) -> torch.Tensor:
        return self.norm(stage_input.detach()) @ self.weight.t()


def critic_loss(logits: torch.Tensor, prediction: torch.Tensor, labels: torch.Tensor,
                label_weight: float) -> tuple[torch.Tensor, dict]:
    """Mean over the labelled tokens of -sum_v t(v) log softmax(logits)(v), t = (1 - a) softmax(prediction)
    + a onehot(y). Terms: the critic's own next-token cross-entropy, and KL(q_{k+1} || critic), how
    closely it follows the stage's prediction."""
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

    label_weight = 0.5  # a: the labels' share of the critic's target

    def attach_input_critic(self) -> None:
        self.critic = InputCritic(self.config)

    def input_critic_loss(self, features: torch.Tensor, labels: torch.Tensor,
                          prediction: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The critic's loss on this micro-batch. `features`: what it reads (Variant.critic_features);
        `prediction`: the stage's (the last stage's LM logits), else the local readout's from this
        micro-batch's `loss`."""
        prediction = self.prediction if prediction is None else prediction
        self.prediction = None
        return critic_loss(self.critic(features), prediction, labels, self.label_weight)

    @torch.no_grad()
    def publish(self) -> torch.Tensor | None:
        return self.critic.weight.detach() if self.critic is not None else None


class LastStageCritic(_OwnsInputCritic, StageFeedback):
    """The last stage's block under a critic variant: C_{S-2} and nothing else (its own loss is the
    model's LM loss, whose logits are the critic's target)."""

    def __init__(self, config, options):
        super().__init__(config, options)
        self.norm = None  # no readout of its own
        self.attach_input_critic()


@register
class CriticFeedback(_OwnsInputCritic, _CrossEntropyReadout, StageFeedback):
    """L_k = -log softmax(norm(h_k) C_k^T)(y_t), C_k trained by stage k+1 (module docstring)."""

    name = "critic"
    sends_table = True            # the critic C_k, [V, H]
    trains_input_critic = True
    trained_operand = False       # the received critic is data on stage k
    per_token_readout = False     # the critic trains on the stage's whole micro-batch with its input

    @classmethod
    def accepted_options(cls):
        return frozenset()  # the critic is a full [V, H] matrix: no dim=, neg=, table= or refresh= yet

    @classmethod
    def input_critic_flops_per_token(cls, options, config) -> float:
        """Forward 2 H V and the weight gradient 2 H V (the input is detached)."""
        return 4.0 * config.hidden_size * config.vocab_size

    @classmethod
    def readout_saved_bytes_per_token(cls, options, config, dtype_bytes, norm_saved_bytes, micro_batch_tokens=None):
        return None  # the critic's [tokens, V] target and log-probabilities are not in the planner yet

    @classmethod
    def last_stage_block(cls, config, options) -> StageFeedback:
        return LastStageCritic(config, options)

    def __init__(self, config, options):
        super().__init__(config, options)
        self._build_readout(config)
        self.prediction = None  # this micro-batch's local readout logits, the critic's target downstream

    def readout_operand(self) -> torch.Tensor:
        if self._upstream is None:
            raise RuntimeError("prepare() must be given the downstream stage's critic before local_loss()")
        return self._upstream

    def next_token_loss(self, hidden, labels):
        z = self.readout_input(hidden)
        logits = z @ self.readout_operand().to(z.dtype).t()
        self.prediction = logits.detach()
        ce = delta_categorical_agreement(logits, labels).mean()
        return ce, {"ce": ce.detach()}, (z, None)


@register
class ContextCriticFeedback(_ContextTerms, CriticFeedback):
    """The critic's readout plus the reconstruction heads of context.py."""

    name = "critic-context"

    @classmethod
    def readout_flops_per_token(cls, options, config, micro_batch_tokens=None):
        """The critic readout's 4 H V (its operand is data) and 6 H V per reconstruction head (trained)."""
        return (4.0 + 6.0 * cls.offsets) * config.hidden_size * config.vocab_size


# The critic behind the -man readout (next_layer_average.py): stage k reads h_k through Dbar_k, the
# average of stage k+1's first decoder layer, and scores it against C_k, which stage k+1 trains
# on that layer's output (Variant.critic_features): the critic and the copy describe the same
# point of the network. The message is the critic, then the layer copy.
register_composed("critic-man", CriticFeedback, AveragedNextLayer)
register_composed("critic-context-man", ContextCriticFeedback, AveragedNextLayer)
