"""The one stage step (bll_ds/method/stage_step.py) on one CPU process, without the launcher: what a
stage computes per micro-batch and at the step boundary, against plain autograd by hand."""

import pytest
import torch

from bll_ds.method.stage_step import STEP_END, StageStep, run_step_end
from bll_ds.modeling import lm_loss, load_model_spec
from bll_ds.pipeline.build import build_stage, forward_layers
from bll_ds.pipeline.launched import bll_schedule

M = 3  # micro-batches per step


def _scaled_backward(loss, scale_by_micro_batches):
    (loss / M if scale_by_micro_batches else loss).backward()


def _batches(config, stage, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        labels = torch.randint(config.vocab_size, (2, 16), generator=generator)
        inputs = torch.randint(config.vocab_size, (2, 16), generator=generator) if stage == 0 else \
            torch.randn(2, 16, config.hidden_size, generator=generator)
        out.append((inputs, labels))
    return out


@pytest.mark.parametrize("max_mb", [0.0, 1e-5])  # one slice, and a readout sliced over the sequence
def test_micro_batches_accumulate_the_local_gradient_of_the_mean_local_loss(max_mb):
    """M micro-batches through StageStep give the gradient of mean_m L_k(m) w.r.t. the stage's
    blocks, readout and feedback network: exactly what one autograd pass over the same losses gives."""
    config = load_model_spec("models/test-1m.json", vocab_size=97)
    table = torch.randn(config.vocab_size, config.hidden_size) * 0.02
    batches = _batches(config, 1, M)
    grads = {}
    for mode in ("step", "by_hand"):
        built = build_stage(config, 4, 1, seed=3)
        if mode == "step":
            step = StageStep(built.feedback, lm_loss, built.last, max_mb)
            assert step.readout_slices((2, 16)) == (1 if max_mb == 0 else 16)
            step.begin(table)
            for inputs, labels in batches:
                step.local_backward(forward_layers(built, inputs), labels, _scaled_backward)
            step.finish_feedback(_scaled_backward)
            loss = step.mean_loss()
        else:
            # By hand: g_k applied to the table inside the graph, one backward of the mean loss.
            feedback = built.feedback
            feedback.prepare(table)
            targets = feedback.g(table)
            losses = []
            for inputs, labels in batches:
                logits = feedback.norm(forward_layers(built, inputs)) @ targets.t()
                losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size),
                                                                labels.reshape(-1)))
            total = torch.stack(losses).mean()
            total.backward()
            loss = total.item()
        grads[mode] = (loss, {n: p.grad.clone() for n, p in built.module.named_parameters() if p.grad is not None})
    (loss_step, g_step), (loss_hand, g_hand) = grads["step"], grads["by_hand"]
    assert loss_step == pytest.approx(loss_hand, rel=1e-6)
    assert set(g_step) == set(g_hand) and any(n.startswith("bll_feedback.g.") for n in g_step)
    for name in g_hand:
        torch.testing.assert_close(g_step[name], g_hand[name], rtol=1e-5, atol=1e-7, msg=name)


def test_last_stage_trains_on_the_lm_loss_and_publishes_its_head():
    config = load_model_spec("models/test-1m.json", vocab_size=50)
    built = build_stage(config, 2, 1)
    step = StageStep(None, lm_loss, True, readout_max_logits_mb=0.001)
    assert step.readout_slices((2, 16)) == 1  # the LM head is never sliced
    step.begin(None)
    (inputs, labels), = _batches(config, 1, 1)
    outputs = forward_layers(built, inputs)
    loss = step.local_backward(outputs, labels, _scaled_backward)
    assert loss.item() == pytest.approx(lm_loss(outputs, labels).item())
    assert step.terms == {} and len(step.losses) == 1
    head = built.module[-1].lm_head.weight
    published = step.table_to_publish(head)
    assert published.data_ptr() == head.data_ptr() and not published.requires_grad


def test_step_end_runs_in_one_order_for_every_caller():
    calls = []
    run_step_end({name: (lambda name=name: calls.append(name)) for name in STEP_END})
    assert calls == list(STEP_END) == ["finish_feedback", "reduce_grads", "optimizer_step", "publish_table"]
    with pytest.raises(KeyError):
        run_step_end({name: (lambda: None) for name in STEP_END[:-1]})
    # The engine's schedule builds its step-end instructions from the same tuple.
    schedule = bll_schedule.BLLTrainSchedule(micro_batches=2, stages=2, stage_id=0, first_step=0, num_steps=1)
    last_command = list(schedule.steps())[-1]
    assert [type(c) for c in last_command] == [bll_schedule.STEP_END_INSTRUCTIONS[n] for n in STEP_END]
