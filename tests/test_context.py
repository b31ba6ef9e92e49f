"""The context-preserving local loss (bll_ds/method/context.py): targets, loss by hand, costs."""

import pytest
import torch
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


def test_declared_readout_flops_match_the_flop_counter(config):
    torch.manual_seed(2)
    feedback = build_feedback("dgl-context", config)
    feedback.prepare(None)
    batch = 2
    hidden = torch.randn(batch, T, H, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = feedback.loss(hidden, torch.randint(0, V, (batch, T)))
        loss.backward()
    declared = readout_flops_per_token(config, "dgl-context") * batch * T
    assert counter.get_total_flops() == pytest.approx(declared, rel=1e-6)
    assert declared == pytest.approx(3 * 6 * H * V * batch * T)
