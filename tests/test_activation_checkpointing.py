"""Activation checkpointing (--activation_checkpoint_interval, bll_ds/modeling/checkpointing.py).

Recomputing activations must change memory, not numbers: with checkpointing on, a training step
of either method gives the same losses and weights as without, in the one-process emulator and
through the launched DeepSpeed engines; every checkpointed layer still gets its gradient when
its input needs none (BLL's received activations); and the engines' saved-activation meter sees
the smaller stash the memory planner predicts (to the byte, at summary.json's 0.01 MiB).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from helpers import launch_failure, run_pretrain, stage_losses

from bll_bench import memory
from bll_ds.modeling import build_sequential, load_model_spec
from bll_ds.modeling.checkpointing import checkpoint, checkpointed_groups, run_layers
from bll_ds.pipeline.emulated.emulator import EmulatedPipeline
from bll_ds.run.config import BLLConfig
from bll_ds.run.ds_config import DsSettings
from bll_ds.use.trained_run import load_forward_network

SPEC, DS_CONFIG = "models/test-1m.json", "ds_configs/test-1m.json"
B, T = 2, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def config():
    return load_model_spec(SPEC)


def _grads(layers) -> list[torch.Tensor]:
    return [p.grad.clone() for layer in layers for p in layer.parameters()]


@pytest.mark.parametrize("input_requires_grad", [False, True])
@pytest.mark.parametrize("interval", [1, 2])
def test_checkpointed_layers_get_the_same_gradients_even_when_the_input_needs_none(config, interval,
                                                                                  input_requires_grad):
    """BLL's stage input has requires_grad False: a reentrant checkpoint (DeepSpeed's default
    function) then gives its layers no gradient at all; this one gives the exact gradients."""
    layers = list(build_sequential(config, 0))[1:4]  # three decoder layers
    x = torch.randn(B, T, config.hidden_size)
    results = []
    for c in (0, interval):
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_(input_requires_grad)
        out = run_layers(layers, inputs, c)
        assert out.requires_grad
        (out.float() ** 2).sum().backward()
        results.append((out.detach(), _grads(layers), inputs.grad))
    (out0, grads0, input_grad0), (out1, grads1, input_grad1) = results
    assert torch.equal(out0, out1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert (input_grad0 is None) == (input_grad1 is None) == (not input_requires_grad)
    if input_requires_grad:
        assert torch.equal(input_grad0, input_grad1)

    # The classic bug this avoids: DeepSpeed's reentrant checkpoint with an input needing no grad.
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ds_checkpointing.checkpoint(lambda h: run_layers(layers, h, 0), x.clone())
    assert not out.requires_grad  # nothing to back-propagate: the layers would get no gradient
    assert all(p.grad is None for layer in layers for p in layer.parameters())


def test_recompute_replays_the_forward_rng_and_leaves_the_stream_alone():
    """Dropout inside a checkpointed group: the recompute draws the forward's mask, and the RNG
    stream after the backward is the one a run without checkpointing has."""
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    outcomes = []
    for checkpointed in (False, True):
        layer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = checkpoint(layer, x, params=layer.parameters()) if checkpointed else layer(x)
        torch.rand(1)  # something else draws between the forward and the backward
        out.sum().backward()
        outcomes.append((out.detach(), _grads([layer]), torch.rand(4)))
    (out0, grads0, after0), (out1, grads1, after1) = outcomes
    assert torch.equal(out0, out1) and torch.equal(after0, after1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def test_groups_follow_pipeline_module_and_skip_the_embedding_and_head():
    stage0 = ["TokenEmbedding", "DecoderLayer", "DecoderLayer"]
    last = ["DecoderLayer", "DecoderLayer", "OutputHead"]
    assert checkpointed_groups(stage0, 0) == [(0, 3, False)]
    assert checkpointed_groups(stage0, 1) == [(0, 1, False), (1, 2, True), (2, 3, True)]
    assert checkpointed_groups(stage0, 2) == [(0, 2, False), (2, 3, True)]
    assert checkpointed_groups(last, 2) == [(0, 2, True), (2, 3, False)]
    assert checkpointed_groups(last, 3) == [(0, 3, False)]


def _emulated_pipeline(method: str, interval: int) -> EmulatedPipeline:
    """2 stages of test-1m, fp32, 2 micro-batches, AdamW at a constant rate (no warm-up from 0)."""
    ds_config = json.loads(open(DS_CONFIG).read())
    ds_config["bf16"] = {"enabled": False}
    ds_config.pop("scheduler")
    ds = DsSettings(config=ds_config, data_parallel=1, micro_batch_size=2, micro_batches=2, steps=1)
    return EmulatedPipeline(method, load_model_spec(SPEC), 2, ds, seed=5, bll=BLLConfig(),
                            activation_checkpoint_interval=interval)


def _emulated_step(method: str, interval: int, steps: int = 2):
    """Two optimizer steps (BLL: the second uses the published tables), B x T random tokens."""
    pipe = _emulated_pipeline(method, interval)
    config = load_model_spec(SPEC)

    def batch_fn(step_index, m, micro_batches):
        generator = torch.Generator().manual_seed(1000 * step_index + m)
        tokens = torch.randint(config.vocab_size, (B, T + 1), generator=generator)
        return tokens[:, :-1], tokens[:, 1:]

    pipe.start_feedback(0)
    records = pipe.train_steps(0, steps, batch_fn)
    losses = {(k, r.step): r.loss for k, rs in records.items() for r in rs}
    weights = {f"{s.stage_id}.{name}": t.detach().clone() for s in pipe.stages
               for name, t in s.module.state_dict().items()}
    return losses, weights


@pytest.mark.parametrize("method", ["bp", "bll"])
@pytest.mark.parametrize("interval", [1, 2])
def test_emulated_step_is_unchanged_by_checkpointing(method, interval):
    losses_off, weights_off = _emulated_step(method, 0)
    losses_on, weights_on = _emulated_step(method, interval)
    assert losses_on.keys() == losses_off.keys() and len(losses_on) == 4
    for key in losses_off:
        assert losses_on[key] == pytest.approx(losses_off[key], rel=1e-6, abs=0), key
    assert weights_on.keys() == weights_off.keys()
    for name in weights_off:
        torch.testing.assert_close(weights_on[name], weights_off[name], rtol=1e-6, atol=1e-9, msg=name)
    # and the step did move every weight (a layer left without gradients would not move); the
    # rotary tables and the candidate sampler's seed are buffers that never move
    start = {f"{k}.{n}": t for k, n, t in _initial_weights(method)}
    fixed = [n for n in weights_on if "rotary" in n or n.endswith("sample_seed")]
    moved = [n for n in weights_on if n not in fixed and not torch.equal(weights_on[n], start[n])]
    assert len(moved) == len(weights_on) - len(fixed)


def _initial_weights(method: str):
    return [(s.stage_id, n, t.detach().clone()) for s in _emulated_pipeline(method, 0).stages
            for n, t in s.module.state_dict().items()]


# ---- through the launcher: the DeepSpeed engines' own path (PipelineModule.forward) -------------

LAUNCH_STEPS = 3
TOLERANCE = 1e-4  # launched against emulated, as tests/test_emulator.py (process-level float noise)


def _run_args(method: str, out) -> list[str]:
    # Step 2 is traced, and its saved activations metered (train.py _trace_window).
    return ["--model", SPEC, "--deepspeed_config", DS_CONFIG, "--tokenizer", "char", "--steps", str(LAUNCH_STEPS),
            "--seq_len", "32", "--stages", "2", "--method", method, "--log_interval", "1", "--eval_interval", "0",
            "--final_eval_batches", "2", "--save_interval", "0", "--throughput_warmup_steps", "2",
            "--trace_steps", "1", "--no-measure_matmul_peak", "--out", str(out)]


@pytest.mark.launcher
@pytest.mark.parametrize("method,port", [("bll", 29720)])
def test_launched_checkpointing_trains_the_same_and_meters_the_planned_stash(method, port, tmp_path, cache_dir,
                                                                             text_corpus):
    """Launched with --activation_checkpoint_interval 1 (every decoder layer, through DeepSpeed's
    PipelineModule and the engine's forward) against the emulator without checkpointing: the
    same per-step losses and final weights (BLL's stage 1 receives an input needing no gradient:
    a checkpoint that lost its layers' gradients would not train them). The engines' meter
    (summary.json activation_peak_mb) sees what the planner predicts with checkpointing, to the
    0.01 MiB it reports, below the planner's (byte-exact, tests/test_memory.py) peak without."""
    launched, emulated = tmp_path / "launched", tmp_path / "emulated"
    data = ["--data", str(text_corpus)]
    result = run_pretrain(_run_args(method, launched) + data + ["--activation_checkpoint_interval", "1"], ranks=2,
                          cache_dir=cache_dir, master_port=port)
    assert result.returncode == 0, launch_failure(result)
    result = run_pretrain(_run_args(method, emulated) + data + ["--emulate"], ranks=None, cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)

    losses_l, losses_e = stage_losses(launched, 2), stage_losses(emulated, 2)
    assert set(losses_l) == set(losses_e) and len(losses_l) == 2 * LAUNCH_STEPS
    for key in losses_l:
        assert losses_l[key] == pytest.approx(losses_e[key], rel=TOLERANCE), key
    _, layers_l, _ = load_forward_network(launched)
    _, layers_e, _ = load_forward_network(emulated)
    for (name, a), (_, b) in zip(layers_l.state_dict().items(), layers_e.state_dict().items()):
        assert float((a - b).norm()) <= TOLERANCE * max(float(a.norm()), 1e-12), name

    vocab = json.loads((launched / "model_config.json").read_text())["vocab_size"]
    config = load_model_spec(SPEC, vocab_size=vocab)
    run = dict(micro_batch_size=2, seq_len=32, micro_batches=2, dtype="fp32", zero_stage=0, method=method)
    planned = memory.plan(config, 2, 1, activation_checkpoint_interval=1, **run)
    without = memory.plan(config, 2, 1, **run)
    summary = json.loads((launched / "summary.json").read_text())
    peaks = [stage["activation_peak_mb"] for stage in summary["stages_detail"]]
    assert peaks == [round(s.meter_bytes / memory.MIB, 2) for s in planned]
    assert all(p < round(s.meter_bytes / memory.MIB, 2) for p, s in zip(peaks, without))
