"""The averaged next-layer readouts (bll_ds/method/next_layer_average.py, MAN++'s remedy): the
first message is copied and later ones averaged, the scale and shift are trained and the copy is
not, the loss by hand, the declared costs, and the options it refuses. The launched run (exact
resume, no cross-stage gradient) is in tests/test_emulator.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_HIDDEN, TINY_SEQ, TINY_VOCAB, sent_decoder_layer, tiny_model_config

from bll_ds.method.feedback import build_feedback
from bll_ds.method.next_layer_average import AveragedNextLayer
from bll_ds.method.overlap import layer_numel
from bll_ds.method.variants import get as get_variant


T, V, H = TINY_SEQ, TINY_VOCAB, TINY_HIDDEN
MU = AveragedNextLayer.momentum


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


def _receive(feedback, layer):
    feedback.variant.receive(feedback, feedback.variant.compose_message(None, [layer]))


def test_the_first_message_is_copied_and_later_ones_averaged(config):
    feedback = build_feedback("dgl-man", config)
    first, second, third = (sent_decoder_layer(config, seed) for seed in (1, 2, 3))
    _receive(feedback, first)
    for (name, sent), (_, held) in zip(first.named_parameters(), feedback.aux.layer.named_parameters()):
        assert torch.equal(sent, held), name
    _receive(feedback, second)
    _receive(feedback, third)
    for (name, a), (_, b), (_, c), (_, held) in zip(first.named_parameters(), second.named_parameters(),
                                                    third.named_parameters(), feedback.aux.layer.named_parameters()):
        expected = MU * (MU * a + (1 - MU) * b) + (1 - MU) * c
        assert torch.allclose(held, expected, atol=1e-6), name
    assert int(feedback.aux.messages) == 3
    assert "aux.messages" in feedback.state_dict()  # checkpointed: a resumed run averages alike
    message = feedback.variant.compose_message(None, [first])
    assert message.shape == feedback.variant.message_shape(config) == (layer_numel(config),)


def test_loss_by_hand_and_only_the_scale_shift_head_and_stage_are_trained(config):
    torch.manual_seed(4)
    feedback = build_feedback("dgl-man", config)
    layer = sent_decoder_layer(config, 5)
    _receive(feedback, layer)
    with torch.no_grad():
        feedback.aux.scale.uniform_(0.5, 1.5)
        feedback.aux.shift.normal_(std=0.1)
    hidden = torch.randn(2, T, H, requires_grad=True)
    labels = torch.randint(0, V, (2, T))
    loss, _ = feedback.loss(hidden, labels)
    with torch.no_grad():
        read = layer(hidden * feedback.aux.scale + feedback.aux.shift)
    normed = read / torch.sqrt(read.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * feedback.norm.weight
    by_hand = F.cross_entropy((normed @ feedback.head.weight.t()).flatten(0, 1), labels.flatten())
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in feedback.aux.layer.parameters())
    assert feedback.aux.scale.grad.abs().sum() > 0 and feedback.aux.shift.grad.abs().sum() > 0
    assert hidden.grad.abs().sum() > 0 and feedback.head.weight.grad.abs().sum() > 0


def test_the_average_moves_per_message_so_refresh_and_table_options_are_refused():
    for spec in ("dgl-man:refresh=2", "dgl-context-man:table=bf16", "dgl-man:dim=4"):
        with pytest.raises(ValueError, match="does not take the option"):
            get_variant(spec)
    assert get_variant("dgl-context-man:neg=8").options.neg == 8
