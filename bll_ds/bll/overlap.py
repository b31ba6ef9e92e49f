"""Overlapping blocks: the local loss trains through a lagged copy of the next stage's first layer.

A purely local loss asks block k's output to be decodable already; nothing asks it to be useful
to the layer that actually reads it. Interlocking backprop and LoCo (Gomez et al., JMLR 2022;
Xiong et al., NeurIPS 2020) let block k's loss run through the first layer(s) of block k+1. Here
stage k holds a frozen copy D_k of stage k+1's first decoder layer f_{k+1,1}:

    variant             local loss L_k (per token)                        beta_k as in feedback.py
    -----------------   -----------------------------------------------   --------------------------
    prototype-overlap   -log softmax_v(<norm(D_k(h_k))_t, m_k(v)>)[y_t]   prototype: m_k = g_k(m_{k+1})
    dgl-overlap         -log softmax(W_k norm(D_k(h_k))_t)[y_t]           dgl: W_k free

    D_k = f_{k+1,1} as stage k+1 published it after its step max(t - LAG, 0), as the tables are
    (engine/feedback_channel.py), and never trained on stage k.

What crosses a boundary, and why it stays within the method:
- Upstream, once per step, stage k+1's message: its table (prototype only) followed by the
  weights of its first decoder layer, flattened in `named_parameters` order. This is a
  downstream-to-upstream copy of forward weights (docs/METHOD.md says so); its bytes are declared
  by `message_shape` and counted by the engine like a table's.
- No gradient: dL_k/dD_k is never computed (the copy's parameters do not require grad) and
  nothing is sent back. Stage k+1 trains f_{k+1,1} from its own loss only: unlike LoCo, the
  overlap is one-way, which is what keeps the stages independent.
- No wait: the copy has the tables' lag, so it is always already there.

L_k trains block k and the readout. D_k's attention needs the whole sequence, so the readout is
not sliced. Cost: D_k's forward and its input gradient (no weight gradient) per token on top of
the plain readout's; the bytes of one decoder layer per step per hop.
"""

from __future__ import annotations

import math

import torch

from bll_ds.bll.aux_readout import _AuxiliaryLayer
from bll_ds.bll.feedback import LocalHeadFeedback, PrototypeFeedback
from bll_ds.bll.variants import register
from bll_ds.modeling.layers import DecoderLayer


def first_decoder_layer(stage_layers) -> DecoderLayer:
    """The first decoder layer among a stage's forward layers (the embedding rides on stage 0)."""
    for layer in stage_layers:
        if isinstance(layer, DecoderLayer):
            return layer
    raise ValueError("an overlap variant needs a decoder layer on every stage but the first; "
                     "this stage has none (use fewer --stages than decoder layers + 1)")


def layer_numel(config) -> int:
    """Entries of one decoder layer's parameters (what the message carries besides the table)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DecoderLayer(config, layer_idx=0).parameters())


class _OverlapLayer(_AuxiliaryLayer):
    """Mixin: the readout reads D_k(h_k), D_k a frozen copy of the next stage's first layer, which
    sits where the auxiliary variants keep their own trained layer (`self.aux`)."""

    @classmethod
    def readout_flops_per_token(cls, config, micro_batch_tokens=None):
        from bll_ds.measure.flops import layer_attention_flops, layer_projection_flops

        # The plain readout's, plus D_k's forward and input gradient. Frozen weights take no
        # gradient: a weight product costs 2 x its forward, while the attention scores, both of
        # whose operands are activations, cost 3 x.
        context = config.max_position_embeddings
        plain = super(_AuxiliaryLayer, cls).readout_flops_per_token(config, micro_batch_tokens)
        return plain + 2 * layer_projection_flops(config) + 3 * layer_attention_flops(config, context)

    @classmethod
    def message_shape(cls, config):
        table = math.prod(super().message_shape(config) or (0,))
        return (table + layer_numel(config),)

    @classmethod
    def compose_message(cls, table, stage_layers):
        layer = [p.detach().reshape(-1) for p in first_decoder_layer(stage_layers).parameters()]
        parts = ([table.detach().reshape(-1)] if cls.sends_table else []) + layer
        return torch.cat([part.to(layer[0].dtype) for part in parts])

    def __init__(self, config):
        super().__init__(config)
        self.aux.requires_grad_(False)
        self._table_shape = super().message_shape(config)  # the base variant's table, or None

    def prepare(self, message):
        if message is None:
            raise RuntimeError(f"{self.name} needs the downstream stage's message before local_loss()")
        table = None
        offset = 0
        if self._table_shape is not None:
            offset = math.prod(self._table_shape)
            table = message[:offset].view(self._table_shape)
        with torch.no_grad():
            for param in self.aux.parameters():
                param.copy_(message[offset:offset + param.numel()].view_as(param))
                offset += param.numel()
        if offset != message.numel():
            raise ValueError(f"{self.name}: the message has {message.numel()} entries, the table and "
                             f"the layer copy take {offset}; both stages must run the same variant and model")
        super().prepare(table)


@register
class OverlapPrototypeFeedback(_OverlapLayer, PrototypeFeedback):
    """The prototype readout behind a lagged copy of the next stage's first layer."""

    name = "prototype-overlap"


@register
class OverlapLocalHeadFeedback(_OverlapLayer, LocalHeadFeedback):
    """DGL's free local head behind a lagged copy of the next stage's first layer."""

    name = "dgl-overlap"
