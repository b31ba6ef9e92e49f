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
    (pipeline/feedback_channel.py), and never trained on stage k.

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

from bll_ds.method.feedback import LocalHeadFeedback, PrototypeFeedback
from bll_ds.method.variants import register_composed
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


class NextLayerCopy:
    """D_k, the layer a composed variant's readout reads through (variants.Variant): a frozen
    copy of stage k+1's first decoder layer, held as `block.aux`, loaded from the tail of every
    message. The message is cast to the layer's dtype, so table= does not apply; with dim=r the
    table's width would not be the one the copy's output has, so dim= does not either."""

    carries_message = True
    excluded_options = frozenset({"dim", "table"})

    @staticmethod
    def build(config, options) -> DecoderLayer:  # options: this layer takes none of its own
        return DecoderLayer(config, layer_idx=config.num_hidden_layers).requires_grad_(False)

    @staticmethod
    def flops_per_token(config) -> float:
        """D_k's forward and input gradient on top of the readout's. Frozen weights take no
        gradient: a weight product costs 2 x its forward, while the attention scores, both of
        whose operands are activations, cost 3 x."""
        from bll_ds.measure.flops import layer_attention_flops, layer_projection_flops

        context = config.max_position_embeddings
        return 2 * layer_projection_flops(config) + 3 * layer_attention_flops(config, context)

    @staticmethod
    def message_entries(config) -> int:
        return layer_numel(config)

    @staticmethod
    def compose(stage_layers) -> list[torch.Tensor]:
        """On stage k+1: its first decoder layer's weights, flattened in `parameters` order."""
        return [p.detach().reshape(-1) for p in first_decoder_layer(stage_layers).parameters()]

    @staticmethod
    def split(message: torch.Tensor, table_shape, layer: DecoderLayer) -> tuple[torch.Tensor | None, list]:
        """The table in front of the message (or None) and the sent weights, each in the shape of
        `layer`'s parameter it belongs to."""
        offset = math.prod(table_shape) if table_shape is not None else 0
        table = message[:offset].view(table_shape) if table_shape is not None else None
        sent = []
        for param in layer.parameters():
            sent.append(message[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        if offset != message.numel():
            raise ValueError(f"the message has {message.numel()} entries, the table and the layer copy "
                             f"take {offset}; both stages must run the same variant and model")
        return table, sent

    @classmethod
    @torch.no_grad()
    def load(cls, copy: DecoderLayer, message: torch.Tensor, table_shape) -> torch.Tensor | None:
        """On stage k: D_k from the message's tail; returns the table in front of it (or None)."""
        table, sent = cls.split(message, table_shape, copy)
        for param, latest in zip(copy.parameters(), sent):
            param.copy_(latest)
        return table

register_composed("prototype-overlap", PrototypeFeedback, NextLayerCopy)  # the prototype readout behind D_k
register_composed("dgl-overlap", LocalHeadFeedback, NextLayerCopy)        # DGL's free local head behind D_k
