"""The auxiliary-layer readouts (bll_ds/method/aux_readout.py): loss by hand, causality, declared costs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from helpers import TINY_SEQ, TINY_VOCAB, tiny_model_config

from bll_ds.measure.flops import TRAIN_OVER_FORWARD, layer_forward_flops, readout_flops_per_token
from bll_ds.method.feedback import build_feedback
from bll_ds.method.stage_step import slices_for
from bll_ds.method.variants import get as get_variant

T, V = TINY_SEQ, TINY_VOCAB


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


def test_with_its_residual_branches_closed_the_aux_readout_is_the_plain_prototype_readout(config):
    """A_k(h) = h when its attention and MLP output projections are zero: the loss is then the
    cross-entropy of <norm(h), m_k(v)> against y, computed here by hand."""
    torch.manual_seed(0)
    feedback = build_feedback("prototype-aux", config)
    for name, param in feedback.aux.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.zeros_(param)
    table, hidden = torch.randn(V, 8), torch.randn(2, T, 8)
    labels = torch.randint(0, V, (2, T))
    feedback.prepare(table)
    loss, terms = feedback.loss(hidden, labels)
    normed = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)
    scores = normed @ table.t()
    by_hand = (torch.logsumexp(scores, -1) - scores.gather(-1, labels[..., None])[..., 0]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("variant", ["prototype-aux", "dgl-aux"])
def test_the_aux_readout_mixes_earlier_tokens_and_never_later_ones(config, variant):
    """The loss at token t depends on h at t and before (A_k's attention), not after; the plain
    readout depends on h at t alone. Labels of -100 drop every other token from the loss."""
    torch.manual_seed(1)
    feedback = build_feedback(variant, config)
    feedback.prepare(torch.randn(V, 8))
    hidden = torch.randn(1, T, 8, requires_grad=True)
    t = 3
    labels = torch.full((1, T), -100)
    labels[0, t] = 5
    loss, _ = feedback.loss(hidden, labels)
    loss.backward()
    per_token = hidden.grad[0].abs().sum(-1)
    assert (per_token[t + 1:] == 0).all()
    assert (per_token[:t + 1] > 0).all()
    # Because tokens mix, the readout may not be cut into sequence slices.
    assert slices_for(get_variant(variant), (1, T), V, max_logits_mb=1e-9) == 1
    assert slices_for(get_variant(variant.removesuffix("-aux")), (1, T), V, max_logits_mb=1e-9) == T


@pytest.mark.parametrize("variant", ["prototype-aux", "dgl-aux"])
def test_declared_readout_flops_match_the_flop_counter(config, variant):
    """What the FLOPs model charges per token is what a forward + backward of the local loss does
    (at the model's full context, A_k's attention counted unhalved as for the model's layers)."""
    torch.manual_seed(2)
    feedback = build_feedback(variant, config)
    feedback.prepare(torch.randn(V, 8))
    if feedback.sends_table:
        feedback.targets()  # g_k's forward on the table: once per step (step_flops), not per token
    batch = 2
    hidden = torch.randn(batch, T, 8, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = feedback.loss(hidden, torch.randint(0, V, (batch, T)))
        loss.backward()
    counted = counter.get_total_flops() / (batch * T)
    declared = readout_flops_per_token(config, variant)
    assert declared == pytest.approx(counted, rel=0.02)
    plain = readout_flops_per_token(config, variant.removesuffix("-aux"))
    assert declared - plain == TRAIN_OVER_FORWARD * layer_forward_flops(config, T)


def test_the_aux_layer_is_the_feedback_blocks_own_and_counted(config):
    """A_k's weights are trained by the stage's optimizer like the rest of the feedback block, and
    the optimizer-step cost model counts them."""
    plain = get_variant("prototype").trainable_matrix_parameters(config)
    aux = get_variant("prototype-aux").trainable_matrix_parameters(config)
    layer = 8 * 8 * 4 + 3 * 8 * 16  # q, k, v, o and the SwiGLU MLP
    assert aux - plain == layer
    feedback = build_feedback("prototype-aux", config)
    assert any(name.startswith("aux.") for name, _ in feedback.named_parameters())
