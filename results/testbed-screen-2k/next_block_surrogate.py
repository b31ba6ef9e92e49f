"""Screen only (not in the package): the critic behind a learned surrogate of the next block.

The best lever measured (critic-context-man) reads h_k through a copy of stage k+1's first decoder
layer, which costs about 0.7 of a decoder layer per token: over the 5% budget at any vocabulary.
Its ablations say neither the average (mu=0) nor, so far, the scale and shift is what makes it
work, so the question is whether block k gains from reading h_k through *a model of what the
next block does to it*. This screen replaces the copy by a low-rank surrogate that stage k+1 trains
on its own input and output and sends upstream with its critic:

    on stage k+1 (every stage but the first and the last):
        S_k(h)  = U_k gelu(W_k n(h))                  n(h) = h / rms(h), W_k [r, H], U_k [H, r], U_k = 0 at start
        L_S     = |S_k(h_k) - (h_{k+1} - h_k)|^2 / |h_{k+1} - h_k|^2     h_k, h_{k+1} detached:
                                                      the stage's own update of the micro-batch
        C_k     trained as critic-man's: on h_{k+1}, what A_k stands for
        message = [C_k; W_k; U_k^T]                   [V + 2r, H]
    on stage k:
        A_k(h)  = h + S_k(h)                          S_k as received (data)
        L_k     = critic-context's loss of A_k(h_k)

The last stage sends S = 0 (its input's update ends in the LM head, which it does not expose
here), so stage S-2 reads h through the identity, as critic-context does.
Cost at llama-1b (H = 2048, r = 64), beyond the critic: about 20 H r = 2.6 MFLOP per token
(0.6% of a decoder layer), 2 r H entries per hop (1 MiB in fp32). Not declared here: the run's
FLOP rates count the critic's alone. Full-width critic only (the testbed's H = 128).

Registered as critic-context-sur16 (r = 16), the one run."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bll_ds.method.critic import ContextCriticFeedback, InputCritic, LastStageCritic
from bll_ds.method.variants import register


def _unit_rms(hidden: torch.Tensor) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(hidden.dtype)


def _surrogate(hidden: torch.Tensor, down: torch.Tensor, up_t: torch.Tensor) -> torch.Tensor:
    """S(h) = U gelu(W n(h)); `down` W [r, H], `up_t` U^T [r, H]."""
    return F.gelu(_unit_rms(hidden) @ down.t()) @ up_t


class SurrogateCritic(InputCritic):
    """C_k and S_k, both trained on stage k+1 and sent together."""

    def __init__(self, config, options, rank: int):
        super().__init__(config, options)
        if self.project is not None:
            raise ValueError("the surrogate screen takes the full-width critic only (no dim=)")
        self.down = nn.Parameter(torch.randn(rank, config.hidden_size) * config.hidden_size ** -0.5)
        self.up_t = nn.Parameter(torch.zeros(rank, config.hidden_size))

    def surrogate_loss(self, stage_input: torch.Tensor, stage_output: torch.Tensor) -> torch.Tensor:
        update = (stage_output - stage_input).detach().float()
        predicted = _surrogate(stage_input.detach(), self.down, self.up_t).float()
        return (predicted - update).pow(2).sum() / update.pow(2).sum().clamp_min(1e-12)

    @torch.no_grad()
    def message(self) -> torch.Tensor:
        return torch.cat([self.weight.detach(), self.down.detach(), self.up_t.detach()])


class _OwnsSurrogate:
    rank = 16

    def attach_input_critic(self) -> None:
        self.critic = SurrogateCritic(self.config, self.options, self.rank)

    def input_critic_loss(self, features, labels, prediction=None):
        output = getattr(self, "_stage_output", None)
        self._stage_output = None
        if output is None:  # the last stage: the critic of its input as critic-context's, S_{S-2} = 0
            return super().input_critic_loss(features, labels, prediction)
        critic, terms = super().input_critic_loss(output, labels, prediction)
        fit = self.critic.surrogate_loss(features, output)
        return critic + fit, {**terms, "surrogate_fit": fit.detach()}


def _register(rank: int) -> None:
    last = type(f"LastStageSurrogateCritic{rank}", (_OwnsSurrogate, LastStageCritic), {"rank": rank})

    class SurrogateCriticContext(_OwnsSurrogate, ContextCriticFeedback):
        name = f"critic-context-sur{rank}"

        @classmethod
        def message_shape(cls, options, config):
            return (config.vocab_size + 2 * cls.rank, config.hidden_size)

        @classmethod
        def last_stage_block(cls, config, options):
            return last(config, options)

        def loss(self, hidden, labels):
            self._stage_output = hidden.detach()  # h_{k+1} for the critic and surrogate this block trains
            received = self._received()
            vocab, rank = self.vocab_size, self.rank
            down, up_t = received[vocab:vocab + rank], received[vocab + rank:vocab + 2 * rank]
            return self.local_loss(hidden + _surrogate(hidden, down.to(hidden.dtype), up_t.to(hidden.dtype)), labels)

    SurrogateCriticContext.rank = rank
    SurrogateCriticContext.__qualname__ = SurrogateCriticContext.__name__ = f"SurrogateCriticContext{rank}"
    register(SurrogateCriticContext)


_register(16)
