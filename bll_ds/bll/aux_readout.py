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

from bll_ds.bll.feedback import LocalHeadFeedback, PrototypeFeedback
from bll_ds.bll.variants import register
from bll_ds.modeling.layers import DecoderLayer


class _AuxiliaryLayer:
    """Mixin: the readout reads A_k(h_k) instead of h_k."""

    per_token_readout = False  # A_k's attention needs the whole sequence: no sequence slices

    @classmethod
    def readout_flops_per_token(cls, config, micro_batch_tokens=None):
        from bll_ds.measure.flops import TRAIN_OVER_FORWARD, layer_forward_flops

        # The plain readout's (6HV), plus A_k's forward, input-gradient and weight-gradient products.
        context = config.max_position_embeddings
        return super().readout_flops_per_token(config, micro_batch_tokens) + TRAIN_OVER_FORWARD * layer_forward_flops(config, context)

    @classmethod
    def readout_saved_bytes_per_token(cls, config, dtype_bytes, norm_saved_bytes, micro_batch_tokens=None):
        return None  # A_k's activations depend on the sequence length: not modelled by the planner

    def __init__(self, config):
        super().__init__(config)
        # layer_idx only names the block for HF's cache; A_k is never part of the exported model.
        self.aux = DecoderLayer(config, layer_idx=config.num_hidden_layers)

    def local_loss(self, hidden, labels):
        return super().local_loss(self.aux(hidden), labels)


@register
class AuxPrototypeFeedback(_AuxiliaryLayer, PrototypeFeedback):
    """The prototype readout behind one auxiliary decoder layer."""

    name = "prototype-aux"


@register
class AuxLocalHeadFeedback(_AuxiliaryLayer, LocalHeadFeedback):
    """DGL's free local head behind one auxiliary decoder layer."""

    name = "dgl-aux"
