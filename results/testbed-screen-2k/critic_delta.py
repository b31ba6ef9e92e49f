"""Screen only (not in the package): the received critic plus a free correction that stage k trains.

Stage k's readout under critic-context is C_k as stage k+1 sent it two steps ago: a head that
stage k cannot adapt to the block output it is producing now. dgl-context's free head adapts in
the same step, and at S = 16 it leads (quality.md). Here the readout is the sum

    logits = norm(h_k) (C_k + D_k)^T        C_k received (data), D_k [V, H] stage k's own,
                                            zero at the start, trained by L_k with the block

so the feedback network supplies the prior and stage k only the correction. The critic's own
training on stage k+1 is unchanged. At scale D_k would share the critic's r dimensions and
candidates (its weight gradient, 2 r C FLOPs per token, beside the readout's 4 r C).
Full-width critic only (the testbed's H = 128).

Registered as critic-context-delta."""
import torch
from torch import nn

from bll_ds.method.critic import ContextCriticFeedback
from bll_ds.method.variants import register


@register
class CriticWithCorrection(ContextCriticFeedback):
    name = "critic-context-delta"

    def __init__(self, config, options):
        super().__init__(config, options)
        if self.reduces(options, config):
            raise ValueError("the correction screen takes the full-width critic only (no dim=)")
        self.correction = nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size))

    def readout_operand(self):
        return super().readout_operand() + self.correction
