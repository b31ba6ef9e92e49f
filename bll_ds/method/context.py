"""Context-preserving local loss: block k's output must also say which tokens came before.

A greedy next-token loss on block k rewards only what is decodable at once. Information that pays
off one block later -- above all which tokens precede t, which the next block's attention needs to
match contexts (n-gram and induction features) -- earns block k nothing, so a local loss lets it
fade. InfoPro (Wang et al., ICLR 2021) found this information collapse to be why greedy local
learning loses to backprop, and added a reconstruction term to each local loss. For a causal LM the
natural thing to reconstruct is the preceding tokens. Stage k's local loss becomes

    L_k = -log q_k(y_t | h_t) + (lambda / J) sum_{j=1..J} -log r_{k,j}(x_{t-j} | h_t)

    q_k     = softmax(O_k norm(h))       the next-token readout: dgl-context O_k = W_k, free;
                                         prototype-context O_k = m_k = g_k(m_{k+1}), the
                                         feedback network's table (feedback.py)
    r_{k,j} = softmax(R_{k,j} norm(h))   a free head per offset j, owned by stage k
    x_{t-j} = y_{t-j-1}                  the input j tokens back, read off the shifted labels;
                                         positions t <= j have none and drop out of that term

with lambda = `weight` = 0.5 and J = `offsets` = 2, class attributes (so that the costs the class
declares are the run's; other values are a subclass with another name). j starts at 1: the current
token x_t rides in the residual stream from the embedding on, so reconstructing it is free. The
heads are never used at inference and are not exported. What crosses a stage boundary is the
readout's: nothing for dgl-context, the target table m_{k+1} for prototype-context.

Cost: J more [V]-way readouts per token, 6 H V FLOPs each, on top of dgl's (`readout_heads`; with
the options of variant_options.py, 6 r C each, the heads sharing z and the candidates). The offset targets of
a token come from labels earlier in the sequence, so the readout is not cut into sequence slices.
"""

from __future__ import annotations

import torch
from torch import nn

from bll_ds.method.feedback import LocalHeadFeedback, PrototypeFeedback
from bll_ds.method.variants import register

IGNORE = -100


def preceding_tokens(labels: torch.Tensor, offset: int) -> torch.Tensor:
    """x_{t-offset} for every position t of [B, T] next-token labels (labels[t] = x_{t+1}), and
    IGNORE where the sequence holds no such token (t <= offset) or the label there is ignored."""
    shifted = torch.full_like(labels, IGNORE)
    reach = labels.shape[1] - offset - 1
    if reach > 0:
        shifted[:, offset + 1:] = labels[:, :reach]
    return shifted


def masked_mean(per_token: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets != IGNORE
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


class _ContextTerms:
    """The reconstruction terms on a cross-entropy readout (feedback.py _CrossEntropyReadout):
    J more heads R_{k,j} on the readout's z, sharing its candidates."""

    per_token_readout = False  # the offset targets reach back across a sequence slice's start

    offsets = 2   # J
    weight = 0.5  # lambda
    readout_heads = 1 + offsets  # the next-token head and J reconstruction heads share z and the candidates

    @classmethod
    def readout_saved_bytes_per_token(cls, options, config, dtype_bytes, norm_saved_bytes, micro_batch_tokens=None):
        """The heads' (the readout's count with readout_heads), plus each reconstruction term's bool
        mask; None where the base readout is not modelled."""
        heads = super().readout_saved_bytes_per_token(options, config, dtype_bytes, norm_saved_bytes,
                                                      micro_batch_tokens)
        return None if heads is None else heads + cls.offsets

    @classmethod
    def readout_saved_bytes_per_micro_batch(cls, options, config, dtype_bytes, micro_batch_tokens):
        """Each reconstruction head's cross-entropy total_weight (fp32) and masked_mean's int64 count."""
        return (super().readout_saved_bytes_per_micro_batch(options, config, dtype_bytes, micro_batch_tokens)
                + cls.offsets * (4 + 8))

    def __init__(self, config, options):
        super().__init__(config, options)
        width = self.readout_width(options, config)
        self.context_heads = nn.ModuleList(nn.Linear(width, config.vocab_size, bias=False)
                                           for _ in range(self.offsets))
        for head in self.context_heads:
            nn.init.normal_(head.weight, std=config.initializer_range)

    def local_loss(self, hidden, labels):
        # The offset targets are earlier labels of the same micro-batch, so the candidates drawn
        # for the labels (neg=n) hold every target of every head.
        ce, terms, (z, candidates) = self.next_token_loss(hidden, labels)
        reconstruction = 0.0
        for offset, head in enumerate(self.context_heads, start=1):
            targets = preceding_tokens(labels, offset)
            term = masked_mean(self.readout_cross_entropy(z, head.weight, targets, candidates), targets)
            terms[f"context_ce_{offset}"] = term.detach()
            reconstruction = reconstruction + term / len(self.context_heads)
        return ce + self.weight * reconstruction, terms


@register
class ContextLocalHeadFeedback(_ContextTerms, LocalHeadFeedback):
    """DGL's free local head plus J heads that reconstruct the preceding tokens."""

    name = "dgl-context"


@register
class ContextPrototypeFeedback(_ContextTerms, PrototypeFeedback):
    """The feedback network's readout (prototype: m_k = g_k(m_{k+1})) plus the same J heads."""

    name = "prototype-context"
