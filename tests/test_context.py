"""The context-preserving local loss (bll_ds/method/context.py): targets, loss by hand, costs."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from helpers import TINY_HIDDEN, TINY_SEQ, TINY_VOCAB, tiny_model_config

from bll_ds.measure.flops import readout_flops_per_token
from bll_ds.method.context import IGNORE, ContextLocalHeadFeedback, preceding_tokens
from bll_ds.method.feedback import build_feedback
from bll_ds.method.stage_step import slices_for
from bll_ds.method.variants import get as get_variant

T, V, H = TINY_SEQ, TINY_VOCAB, TINY_HIDDEN


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


def test_preceding_tokens_are_the_inputs_offset_positions_back():
    """Inputs x = 10 11 12 13 14 15 16, labels y_t = x_{t+1} = 11..16. At t, x_{t-1} = y_{t-2}."""
    labels = torch.tensor([[11, 12, 13, 14, 15, 16]])
    assert preceding_tokens(labels, 1).tolist() == [[IGNORE, IGNORE, 11, 12, 13, 14]]
    assert preceding_tokens(labels, 2).tolist() == [[IGNORE, IGNORE, IGNORE, 11, 12, 13]]
    assert preceding_tokens(labels, 6).tolist() == [[IGNORE] * 6]


def _ce(logits, targets):
    """Mean cross-entropy over the positions with a target, by hand."""
    keep = targets != IGNORE
    picked = logits[keep].gather(-1, targets[keep][:, None])[:, 0]
    return (torch.logsumexp(logits[keep], -1) - picked).mean()


def test_loss_is_next_token_ce_plus_the_weighted_mean_of_the_reconstruction_ces(config):
    torch.manual_seed(0)
    feedback = build_feedback("dgl-context", config)
    feedback.prepare(None)
    hidden, labels = torch.randn(2, T, H), torch.randint(0, V, (2, T))
    loss, terms = feedback.loss(hidden, labels)
    normed = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    next_token = _ce(normed @ feedback.head.weight.t(), labels)
    back = [_ce(normed @ head.weight.t(), preceding_tokens(labels, j))
            for j, head in enumerate(feedback.context_heads, start=1)]
    by_hand = next_token + ContextLocalHeadFeedback.weight * sum(back) / len(back)
    assert len(back) == ContextLocalHeadFeedback.offsets == 2
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(next_token.item(), rel=1e-5)
    assert terms["context_ce_2"].item() == pytest.approx(back[1].item(), rel=1e-5)


def test_the_loss_at_t_reads_only_h_at_t_and_sends_nothing_upstream(config):
    """Reconstruction reads h_t alone (the history must already be in it), so h after t gets no
    gradient from targets at t; nothing travels upstream; no sequence slices."""
    torch.manual_seed(1)
    feedback = build_feedback("dgl-context", config)
    feedback.prepare(None)
    hidden = torch.randn(1, T, H, requires_grad=True)
    labels = torch.randint(0, V, (1, T))
    loss, _ = feedback.loss(hidden, labels)
    grad, = torch.autograd.grad(loss, hidden)
    assert (grad[0].abs().sum(-1) > 0).all()
    assert feedback.variant.message_shape(config) is None
    assert feedback.variant.table_bytes_per_step(config, 4) == 0
    assert feedback.publish() is None
    assert slices_for(get_variant("dgl-context"), (1, T), V, max_logits_mb=1e-9) == 1


@pytest.mark.parametrize("variant", ["dgl-context", "prototype-context"])
def test_declared_readout_flops_match_the_flop_counter(config, variant):
    torch.manual_seed(2)
    feedback = build_feedback(variant, config)
    feedback.prepare(torch.randn(V, H) if feedback.variant.sends_table else None)
    if feedback.variant.sends_table:
        feedback.targets()  # m_k = g_k(m_{k+1}) once per step: step_flops, not the per-token readout
    batch = 2
    hidden = torch.randn(batch, T, H, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = feedback.loss(hidden, torch.randint(0, V, (batch, T)))
        loss.backward()
    declared = readout_flops_per_token(config, variant) * batch * T
    assert counter.get_total_flops() == pytest.approx(declared, rel=1e-6)
    assert declared == pytest.approx(3 * 6 * H * V * batch * T)


def test_prototype_context_is_the_prototype_readout_plus_the_same_reconstruction_terms(config):
    """The feedback network's readout with dgl-context's terms: CE against m_k = g_k(m_{k+1}) plus
    lambda times the mean of the J reconstruction cross-entropies, and its table travels upstream."""
    torch.manual_seed(2)
    feedback = build_feedback("prototype-context", config)
    upstream = torch.randn(V, H)
    feedback.prepare(upstream)
    hidden, labels = torch.randn(2, T, H), torch.randint(0, V, (2, T))
    loss, terms = feedback.loss(hidden, labels)
    z = feedback.norm(hidden)
    table = feedback.g(upstream)
    next_token = F.cross_entropy((z @ table.t()).flatten(0, 1), labels.flatten())
    back = []
    for offset, head in enumerate(feedback.context_heads, start=1):
        targets = preceding_tokens(labels, offset)
        back.append(F.cross_entropy((z @ head.weight.t()).flatten(0, 1), targets.flatten(), ignore_index=IGNORE))
    by_hand = next_token + ContextLocalHeadFeedback.weight * sum(back) / len(back)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert set(terms) >= {"ce", "table_drift", "context_ce_1", "context_ce_2"}
    assert feedback.variant.sends_table and feedback.variant.message_shape(config) == (V, H)
    assert not feedback.variant.per_token_readout
