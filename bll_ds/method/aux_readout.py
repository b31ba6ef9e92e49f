"""Local readouts with more capacity: one auxiliary decoder layer before the readout (AugLocal).

A purely local readout asks block k's output h_k to be linearly decodable into the next token
already, which pushes early blocks towards what the last block computes and away from features
that only later blocks can use. AugLocal (Ma et al., ICLR 2024) gives each block's local loss a
small network shaped like the later blocks instead. Here that network is one decoder layer of the
model's own shape, with its own weights, owned by the stage's feedback block:

    variant         local loss L_k (per token)                       beta_k as in feedback.py
    -------------   ----------------------------------------------   --------------------------
    prototype-aux   -log softmax_v(<norm(A_k(h_k))_t, m_k(v)>)[y_t]   prototype: m_k = g_k(m_{k+1})
    dgl-aux         -log softmax(W_k norm(A_k(h_k))_t)[y_t]           dgl: W_k free

A_k is a causal decoder layer (the model family's HF block, bll_ds/modeling/layers.py). L_k trains
block k, A_k and the readout together; A_k is never used at inference and is not exported. It
sees the whole sequence of h_k (attention), so the loss is not a sum of per-token terms of h_k and
its readout is not sliced along the sequence. It starts as the model's layers start (HF's
initialisation: small residual branches), so at step 0 the readout is close to the plain one.

Cost, declared for the FLOPs model and the simulator: one decoder layer's training FLOPs per token
(3 x its forward, attention at the model's full context) on top of the plain readout's. No bytes
cross a stage boundary beyond the plain variant's table.
"""

from __future__ import annotations

from bll_ds.method.feedback import LocalHeadFeedback, PrototypeFeedback
from bll_ds.method.variants import register_composed
from bll_ds.modeling.layers import DecoderLayer


class AuxiliaryLayer:
    """A_k, the layer a composed variant's readout reads through (variants.Variant): built after
    the block's own parameters, held as `block.aux`, trained with them; nothing travels."""

    carries_message = False
    excluded_options: frozenset[str] = frozenset()

    @staticmethod
    def build(config, options) -> DecoderLayer:  # options: this layer takes none of its own
        # layer_idx only names the block for HF's cache; A_k is never part of the exported model.
        return DecoderLayer(config, layer_idx=config.num_hidden_layers)

    @staticmethod
    def flops_per_token(config) -> float:
        """A_k's forward, input-gradient and weight-gradient products, on top of the readout's."""
        from bll_ds.measure.flops import TRAIN_OVER_FORWARD, layer_forward_flops

        return TRAIN_OVER_FORWARD * layer_forward_flops(config, config.max_position_embeddings)


register_composed("prototype-aux", PrototypeFeedback, AuxiliaryLayer)  # the prototype readout behind A_k
register_composed("dgl-aux", LocalHeadFeedback, AuxiliaryLayer)        # DGL's free local head behind A_k
