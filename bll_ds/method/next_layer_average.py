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
                                                   (affine=0: A_k(h) = Dbar_k(h), for the ablation)
    Dbar_k   <- mu Dbar_k + (1 - mu) D_{k+1}^{(t - LAG)}   once per step, as the message arrives;
                                                   the first message is copied; mu=0.9 (an option;
                                                   mu=0: the latest copy, overlap.py's D_k)

D_{k+1}^{(j)} is stage k+1's first decoder layer as published after its step j (the tables' lag
rule, engine/feedback_channel.py), sent upstream as overlap.py sends it: a named copy of forward
weights (docs/METHOD.md, "What travels"), never trained on stage k and never sent back. Dbar_k is
the stage's state (in its checkpoint, so a resumed run averages what an uninterrupted one would);
gamma_k and b_k are the stage's own parameters. Because the average moves once per arriving
message, the refresh= option (a message every k steps, the same one k times) is not offered.

Precision: a bf16 run holds the frozen layer in bf16, where a step of (1 - mu) times a small
weight change is below bf16's resolution (2^-8 relative) and would round away. So the average is
kept in fp32 beside the layer (one layer's parameters, 4 bytes each, per stage; in the checkpoint)
and the layer takes its rounding after every message. In fp32 runs the two are the same values.
Measured only in fp32 so far (the CPU runs).

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
    behind a trained per-channel scale and shift (none with affine=0).

    The average itself is kept in fp32 (`average`, flat, in the checkpoint as this module's extra
    state, which no dtype cast touches); the layer holds its rounding to the run's dtype. In a
    bf16 run a step of (1 - mu) times a small weight change would otherwise round away."""

    def __init__(self, config, momentum: float, affine: bool):
        super().__init__()
        self.momentum = momentum
        self.scale = nn.Parameter(torch.ones(config.hidden_size)) if affine else None
        self.shift = nn.Parameter(torch.zeros(config.hidden_size)) if affine else None
        self.layer = DecoderLayer(config, layer_idx=config.num_hidden_layers).requires_grad_(False)
        self.register_buffer("messages", torch.zeros((), dtype=torch.long))  # averaged so far
        self.average: torch.Tensor | None = None  # Dbar_k's parameters, flat, fp32

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            hidden = hidden * self.scale.to(hidden.dtype) + self.shift.to(hidden.dtype)
        return self.layer(hidden)

    @torch.no_grad()
    def take(self, sent: list[torch.Tensor]) -> None:
        """Average one message's copy in: the first is taken as sent, later ones with mu."""
        latest = torch.cat([part.reshape(-1).float() for part in sent])
        if int(self.messages) == 0:
            self.average = latest.clone()
        else:
            if self.average is None:  # a checkpoint from before the fp32 average: the layer's values
                self.average = torch.cat([p.reshape(-1).float() for p in self.layer.parameters()])
            self.average = self.average.to(latest.device)
            self.average.lerp_(latest, 1.0 - self.momentum)
        offset = 0
        for param in self.layer.parameters():
            param.copy_(self.average[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        self.messages += 1

    def get_extra_state(self):
        return {"average": None if self.average is None else self.average.cpu()}

    def set_extra_state(self, state) -> None:
        self.average = state["average"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the fp32 average have no extra state: rebuild it from the layer.
        state_dict.setdefault(prefix + "_extra_state", {"average": None})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class AveragedNextLayer(NextLayerCopy):
    """Dbar_k, the layer a composed variant's readout reads through: overlap.py's message, averaged."""

    excluded_options = NextLayerCopy.excluded_options | {"refresh"}
    added_options = frozenset({"mu", "affine"})

    @staticmethod
    def build(config, options) -> ScaledAverage:
        return ScaledAverage(config, options.mu, bool(options.affine))

    @classmethod
    def load(cls, average: ScaledAverage, message: torch.Tensor, table_shape) -> torch.Tensor | None:
        table, sent = cls.split(message, table_shape, average.layer)
        average.take(sent)
        return table


register_composed("dgl-man", LocalHeadFeedback, AveragedNextLayer)                 # DGL's head behind A_k
register_composed("dgl-context-man", ContextLocalHeadFeedback, AveragedNextLayer)  # dgl-context behind A_k
