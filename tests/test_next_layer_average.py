"""The averaged next-layer readouts (bll_ds/method/next_layer_average.py, MAN++'s remedy): the
first message is copied and later ones averaged, the scale and shift are trained and the copy is
not, the loss by hand, the declared costs, and the options it refuses. The launched run (exact
resume, no cross-stage gradient) is in tests/test_emulator.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_HIDDEN, TINY_SEQ, TINY_VOCAB, sent_decoder_layer, tiny_model_config

from bll_ds.method.feedback import build_feedback
from bll_ds.method.overlap import layer_numel
from bll_ds.method.variant_options import VariantOptions
from bll_ds.method.variants import get as get_variant


T, V, H = TINY_SEQ, TINY_VOCAB, TINY_HIDDEN
MU = VariantOptions().mu


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
    for spec in ("dgl-man:refresh=2", "dgl-context-man:table=bf16", "dgl-man:dim=4", "dgl-overlap:mu=0.5"):
        with pytest.raises(ValueError, match="does not take the option"):
            get_variant(spec)
    for spec in ("dgl-man:mu=1", "dgl-man:mu=-0.1", "dgl-man:affine=2"):
        with pytest.raises(ValueError, match="must be"):
            get_variant(spec)
    assert get_variant("dgl-context-man:neg=8").options.neg == 8


def test_the_ablations_latest_copy_and_no_scale_or_shift(config):
    """mu=0: every message replaces the copy (overlap.py's D_k); affine=0: no scale and shift."""
    feedback = build_feedback("dgl-context-man:mu=0:affine=0", config)
    assert feedback.aux.scale is None and feedback.aux.shift is None
    assert feedback.variant.name == "dgl-context-man:mu=0:affine=0"
    first, second = sent_decoder_layer(config, 1), sent_decoder_layer(config, 2)
    _receive(feedback, first)
    _receive(feedback, second)
    for (name, sent), (_, held) in zip(second.named_parameters(), feedback.aux.layer.named_parameters()):
        assert torch.equal(sent, held), name
    hidden = torch.randn(2, T, H)
    assert torch.equal(feedback.aux(hidden), feedback.aux.layer(hidden))


def test_in_bf16_the_average_is_kept_in_fp32_and_the_layer_holds_its_rounding(config):
    """A weight change of 1e-3 relative, times 1 - mu, is below bf16's resolution: averaged in the
    layer's bf16 parameters it would round away; the fp32 average moves, and so, once it has
    moved far enough, does the layer."""
    feedback = build_feedback("dgl-man", config).to(torch.bfloat16)
    layer = sent_decoder_layer(config, 1)
    _receive(feedback, layer)
    start = feedback.aux.average.clone()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(1.001)
    for _ in range(30):
        _receive(feedback, layer)
    expected = start + (torch.cat([p.reshape(-1) for p in layer.parameters()]) - start) * (1 - MU ** 30)
    assert feedback.aux.average.dtype == torch.float32
    assert torch.allclose(feedback.aux.average, expected, rtol=1e-5, atol=1e-7)
    held = torch.cat([p.reshape(-1).float() for p in feedback.aux.layer.parameters()])
    assert torch.equal(held, feedback.aux.average.to(torch.bfloat16).float())


def test_the_average_is_checkpointed_and_an_older_checkpoint_without_it_resumes(config):
    feedback = build_feedback("dgl-man", config)
    for seed in (1, 2):
        _receive(feedback, sent_decoder_layer(config, seed))
    state = feedback.state_dict()
    restored = build_feedback("dgl-man", config)
    restored.load_state_dict(state)
    assert torch.equal(restored.aux.average, feedback.aux.average)
    # Written before the average had its own copy: in fp32 the layer's values are the average.
    older = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    restored = build_feedback("dgl-man", config)
    restored.load_state_dict(older)
    third = sent_decoder_layer(config, 3)
    _receive(restored, third)
    _receive(feedback, third)
    assert torch.equal(restored.aux.average, feedback.aux.average)


def test_export_writes_the_average_beside_the_blocks_weights(config, tmp_path):
    from safetensors.torch import load_file

    from bll_ds.run import checkpoint
    from bll_ds.run.run_dir import checkpoints
    from bll_ds.use.trained_run import _export_feedback

    feedback = build_feedback("dgl-man", config)
    _receive(feedback, sent_decoder_layer(config, 1))
    folder = checkpoints(tmp_path / "run") / checkpoint.tag_for(4)
    folder.mkdir(parents=True)
    torch.save({"feedback": feedback.state_dict(), "inbox": None}, folder / "bll_stage00.pt")
    (tmp_path / "out").mkdir()
    written = _export_feedback(tmp_path / "run", {"method": "bll", "step": 4, "bll_variant": "dgl-man"},
                               tmp_path / "out")
    exported = load_file(str(tmp_path / "out" / written[0]))
    assert torch.equal(exported["aux._extra_state.average"], feedback.aux.average)
    assert torch.equal(exported["head.weight"], feedback.head.weight)
