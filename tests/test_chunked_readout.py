"""The sliced local readout computes the unsliced loss and gradients, with less saved memory."""

import pytest
import torch

from bll_ds.method.feedback import build_feedback
from bll_ds.method.stage_step import slices_for, sliced_local_backward
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling import load_model_spec
from bll_ds.pipeline.trace import SavedActivationMeter

GAS = 4  # gradient-accumulation steps the engine's backward divides by


def _setup(variant):
    torch.manual_seed(0)
    config = load_model_spec("models/test-1m.json", vocab_size=300)
    block = torch.nn.Linear(config.hidden_size, config.hidden_size)
    feedback = build_feedback(variant, config)
    upstream = torch.randn(config.vocab_size, config.hidden_size)
    x = torch.randn(2, 24, config.hidden_size)
    labels = torch.randint(0, config.vocab_size, (2, 24))
    return config, block, feedback, upstream, x, labels


def _backward(loss, scale_wrt_gas):
    (loss / GAS if scale_wrt_gas else loss).backward()


def _run(variant, slices):
    config, block, feedback, upstream, x, labels = _setup(variant)
    feedback.prepare(upstream)
    meter = SavedActivationMeter()
    meter.exclude([*block.parameters(), *feedback.parameters(), *feedback.buffers()])
    with meter.hooks():
        hidden = block(x)
        if slices == 1:
            loss, terms = feedback.loss(hidden, labels)
            _backward(loss, True)
        else:
            loss, terms = sliced_local_backward(feedback, hidden, labels, slices, _backward)
    feedback.finish_step(lambda surrogate: _backward(surrogate, False))
    grads = {f"block.{n}": p.grad for n, p in block.named_parameters()}
    grads.update({f"feedback.{n}": p.grad for n, p in feedback.named_parameters() if p.grad is not None})
    return loss.item(), {k: v.item() for k, v in terms.items()}, grads, meter.peak_bytes


@pytest.mark.parametrize("variant", ["prototype", "dgl", "drtp"])
def test_sliced_readout_equals_the_unsliced_one(variant):
    loss1, terms1, grads1, peak1 = _run(variant, 1)
    loss4, terms4, grads4, peak4 = _run(variant, 4)
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    assert terms4 == pytest.approx(terms1, rel=1e-5)
    assert grads1.keys() == grads4.keys() and len(grads1) > 2
    for name in grads1:
        torch.testing.assert_close(grads4[name], grads1[name], rtol=1e-4, atol=1e-6, msg=name)
    assert peak4 < peak1  # one slice's logits alive at a time, not the whole sequence's


def test_slices_for_caps_the_logits_and_never_slices_the_guarded_variants():
    shape = torch.Size([1, 2048, 4096])
    assert slices_for(get_variant("prototype"), shape, 32000, 64) == 4  # 250 MiB of logits -> 4 slices of <= 64 MiB
    assert slices_for(get_variant("prototype"), shape, 32000, 0) == 1
    assert slices_for(get_variant("gaussian"), shape, 32000, 64) == 1
    assert slices_for(get_variant("dgl"), torch.Size([1, 3, 8]), 10**9, 1) == 3  # never more slices than tokens
