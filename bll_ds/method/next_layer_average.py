"""A lagged moving average of the next stage's first layer in the readout, with a learnable scale
and shift on its input (the MAN++ remedy; Su et al., 2025).

The one-way overlap variants (overlap.py) read block k's output through a frozen copy D_k of
stage k+1's first layer. Measured at S = 8 they let the residual stream grow 12-18x larger than
under dgl: block k can make D_k's residual branches negligible by inflating h_k, and the readout
then sees h_k itself. MAN and MAN++ (Su et al.) keep an exponential moving average of the
neighbouring block instead of its latest weights, and put a learnable per-channel scale and bias
in front of it, so that what block k hands over can be brought to the scale the copy expects
without block k inflating its stream:

    variant           local loss L_k                                     readout as in
    ---------------   ------------------------------------------------   -------------------
    dgl-man           -log softmax(W_k norm(A_k(h_k)))[y_t]               dgl (feedback.py)
    dgl-context-man   dgl-context's loss of A_k(h_k)                      context.py

    A_k(h)    = Dbar_k(gamma_k * h + b_k)          gamma_k = 1, b_k = 0 at the start; trained by L_k
    Dbar_k   <- mu Dbar_k + (1 - mu) D_{k+1}^{(t - LAG)}   once per step, as the message arrives;
                                                   the first message is copied; mu = `momentum`

D_{k+1}^{(j)} is stage k+1's first decoder layer as published after its step j (the tables' lag
rule, engine/feedback_channel.py), sent upstream as overlap.py sends it: a named copy of forward
weights (docs/METHOD.md, "What travels"), never trained on stage k and never sent back. Dbar_k is
the stage's state (in its checkpoint, so a resumed run averages what an uninterrupted one would);
gamma_k and b_k are the stage's own parameters. Because the average moves once per arriving
message, the refresh= option (a message every k steps, the same one k times) is not offered.

Precision: the average lives in the frozen layer's parameters, which a bf16 run holds in bf16;
there a step of (1 - mu) times a small weight change is below bf16's resolution (2^-8 relative)
and rounds away, so the average would lag far behind the sent copies. Measured only in fp32 so
far (the CPU runs); a bf16 run wants the average kept in fp32.

Cost: overlap.py's (Dbar_k's forward and input gradient) plus an elementwise scale and shift
(not counted: O(H) per token against the layer's O(H^2)); the bytes of one decoder layer per step
per hop, as overlap.py.
"""

from __future__ import annotations

import torch
from torch import nn

from bll_ds.method.context import ContextLocalHeadFeedback
from bll_ds.method.feedback import LocalHeadFeedback
from bll_ds.method.overlap import NextLayerCopy
from bll_ds.method.variants import register_composed
from bll_ds.modeling.layers import DecoderLayer


class ScaledAverage(nn.Module):
    """A_k(h) = Dbar_k(gamma_k * h + b_k): the averaged copy (frozen parameters, the stage's state)
    behind a trained per-channel scale and shift."""

    def __init__(self, config):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.shift = nn.Parameter(torch.zeros(config.hidden_size))
        self.layer = DecoderLayer(config, layer_idx=config.num_hidden_layers).requires_grad_(False)
        self.register_buffer("messages", torch.zeros((), dtype=torch.long))  # averaged so far

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer(hidden * self.scale.to(hidden.dtype) + self.shift.to(hidden.dtype))


class AveragedNextLayer(NextLayerCopy):
    """Dbar_k, the layer a composed variant's readout reads through: overlap.py's message, averaged."""

    momentum = 0.9  # mu: about the last ten messages
    excluded_options = NextLayerCopy.excluded_options | {"refresh"}

    @staticmethod
    def build(config) -> ScaledAverage:
        return ScaledAverage(config)

    @classmethod
    @torch.no_grad()
    def load(cls, average: ScaledAverage, message: torch.Tensor, table_shape) -> torch.Tensor | None:
        table, sent = cls.split(message, table_shape, average.layer)
        first = int(average.messages) == 0
        for param, latest in zip(average.layer.parameters(), sent):
            if first:
                param.copy_(latest)
            else:
                param.lerp_(latest.to(param.dtype), 1.0 - cls.momentum)
        average.messages += 1
        return table


register_composed("dgl-man", LocalHeadFeedback, AveragedNextLayer)                 # DGL's head behind A_k
register_composed("dgl-context-man", ContextLocalHeadFeedback, AveragedNextLayer)  # dgl-context behind A_k
