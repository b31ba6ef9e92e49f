"""The overlap readouts (bll_ds/method/overlap.py): loss by hand through the sent layer, the message
round trip, no gradient into the copy, declared costs. The launcher run (no cross-stage gradient,
exact resume) is in tests/test_emulator.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from helpers import TINY_HIDDEN, TINY_SEQ, TINY_VOCAB, sent_decoder_layer, tiny_model_config

from bll_ds.measure.flops import readout_flops_per_token
from bll_ds.method.feedback import build_feedback
from bll_ds.method.overlap import layer_numel
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling.layers import TokenEmbedding

T, V, H = TINY_SEQ, TINY_VOCAB, TINY_HIDDEN
VARIANTS = ["prototype-overlap", "dgl-overlap"]


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


def test_prototype_overlap_loss_is_the_readout_of_the_sent_layer_by_hand(config):
    """L_k = CE(<norm(D(h)), g_k(m_{k+1})>, y) with D the downstream layer exactly as sent, g_k
    written out (m + W2 gelu(W1 m + b1) + b2) and the RMS norm by hand."""
    torch.manual_seed(0)
    feedback = build_feedback("prototype-overlap", config)
    with torch.no_grad():  # g_k away from its zero-initialised second layer
        feedback.g.down.weight.normal_(std=0.3)
    layer, table = sent_decoder_layer(config), torch.randn(V, H)
    feedback.variant.receive(feedback, feedback.variant.compose_message(table, [layer]))
    hidden, labels = torch.randn(2, T, H), torch.randint(0, V, (2, T))
    loss, terms = feedback.loss(hidden, labels)

    g = feedback.g
    targets = table + F.gelu(table @ g.up.weight.t() + g.up.bias) @ g.down.weight.t() + g.down.bias
    with torch.no_grad():
        read = layer(hidden)
    normed = read / torch.sqrt(read.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * feedback.norm.weight
    scores = normed @ targets.t()
    by_hand = (torch.logsumexp(scores, -1) - scores.gather(-1, labels[..., None])[..., 0]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_dgl_overlap_loss_is_its_own_head_on_the_sent_layer_by_hand(config):
    torch.manual_seed(1)
    feedback = build_feedback("dgl-overlap", config)
    layer = sent_decoder_layer(config)
    feedback.variant.receive(feedback, feedback.variant.compose_message(None, [layer]))
    hidden, labels = torch.randn(2, T, H), torch.randint(0, V, (2, T))
    loss, _ = feedback.loss(hidden, labels)
    with torch.no_grad():
        read = layer(hidden)
    normed = read / torch.sqrt(read.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    scores = normed @ feedback.head.weight.t()
    by_hand = (torch.logsumexp(scores, -1) - scores.gather(-1, labels[..., None])[..., 0]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_message_carries_the_table_and_the_first_decoder_layer_and_nothing_else(config, variant):
    """compose_message on stage k+1 (its layers: the embedding, if any, is skipped) and prepare
    on stage k: the copy holds exactly the sent weights, the table exactly the sent table, and
    the declared shape and bytes are the message's."""
    declared = get_variant(variant)
    layer, later = sent_decoder_layer(config, seed=2), sent_decoder_layer(config, seed=3)
    table = torch.randn(V, H)
    message = declared.compose_message(table if declared.sends_table else None, [TokenEmbedding(config), layer, later])
    entries = (V * H if declared.sends_table else 0) + sum(p.numel() for p in layer.parameters())
    assert message.shape == declared.message_shape(config) == (entries,)
    assert entries == (V * H if declared.sends_table else 0) + layer_numel(config)
    assert declared.table_bytes_per_step(config, 2) == 2 * entries

    feedback = build_feedback(variant, config)
    feedback.variant.receive(feedback, message)
    for (name, sent), (_, copy) in zip(layer.named_parameters(), feedback.aux.named_parameters()):
        assert torch.equal(sent, copy), name
    if declared.sends_table:
        assert torch.equal(feedback._upstream, table)
    with pytest.raises(ValueError, match="same variant and model"):
        feedback.variant.receive(feedback, torch.cat([message, torch.zeros(1)]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_copy_takes_no_gradient_and_the_stage_gets_one_through_it(config, variant):
    """dL_k/dD_k is never formed (nothing to send back, nothing for the optimizer); the block
    output receives the gradient of the loss through D_k, causally."""
    torch.manual_seed(4)
    declared = get_variant(variant)
    feedback = build_feedback(variant, config)
    feedback.variant.receive(feedback, declared.compose_message(torch.randn(V, H) if declared.sends_table else None,
                                         [sent_decoder_layer(config)]))
    hidden = torch.randn(1, T, H, requires_grad=True)
    labels = torch.full((1, T), -100)
    labels[0, 3] = 5
    loss, _ = feedback.loss(hidden, labels)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in feedback.aux.parameters())
    per_token = hidden.grad[0].abs().sum(-1)
    assert (per_token[4:] == 0).all() and (per_token[:4] > 0).all()
    plain = variant.removesuffix("-overlap")
    assert declared.trainable_matrix_parameters(config) == get_variant(plain).trainable_matrix_parameters(config)


@pytest.mark.parametrize("variant", VARIANTS + ["dgl-man", "dgl-context-man"])
def test_declared_readout_flops_match_the_flop_counter(config, variant):
    """The copy's forward and its input gradient, no weight gradient, plus the plain readout; for
    the averaged copy (next_layer_average.py) the same, its elementwise scale and shift left out."""
    torch.manual_seed(6)
    declared = get_variant(variant)
    feedback = build_feedback(variant, config)
    feedback.variant.receive(feedback, declared.compose_message(torch.randn(V, H) if declared.sends_table else None,
                                         [sent_decoder_layer(config)]))
    if declared.sends_table:
        feedback.targets()  # g_k on the table: once per step (step_flops), not per token
    batch = 2
    hidden = torch.randn(batch, T, H, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = feedback.loss(hidden, torch.randint(0, V, (batch, T)))
        loss.backward()
    assert readout_flops_per_token(config, variant) == pytest.approx(counter.get_total_flops() / (batch * T),
                                                                     rel=0.02)


def test_a_stage_without_a_decoder_layer_cannot_send_an_overlap_message(config):
    with pytest.raises(ValueError, match="needs a decoder layer"):
        get_variant("dgl-overlap").compose_message(None, [TokenEmbedding(config)])
