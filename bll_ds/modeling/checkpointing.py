"""Activation checkpointing of decoder layers, for both methods and the emulator.

With `--activation_checkpoint_interval c` (c > 0), a stage's layer list (the embedding first on
stage 0, the head last on the last stage) is cut into groups of c consecutive layers, as
DeepSpeed's PipelineModule cuts it (`forward`: range(0, len(forward_funcs), c)). A group made of
DecoderLayers only is checkpointed: its forward runs without a graph and keeps only its input;
its backward runs the forward again (one extra forward per checkpointed group) and then its
backward. A group holding the embedding or the head runs as usual (`checkpointed_groups`). With
c = 1 that is every decoder layer and nothing else.

Why not DeepSpeed's `deepspeed.checkpointing.checkpoint` (PipelineModule's default function):
it is reentrant, and a reentrant checkpoint whose inputs need no gradient returns an output that
needs none either, so its layers get no gradient at all. That is every block-local stage after
the first: its received input has requires_grad False (nothing goes back upstream). torch's
non-reentrant checkpoint (and DeepSpeed's `non_reentrant_checkpoint`) are right, but they save
the recomputed tensors through their own saved-tensor hooks, which hide them from the engines'
SavedActivationMeter (bll_ds/pipeline/trace.py), so the planner's recompute term could not be
measured. `checkpoint` below is a reentrant checkpoint that takes the group's parameters as
inputs of its autograd Function:
- its output needs a gradient whenever a parameter does, whatever the input;
- its backward recomputes under autograd (the meter sees the recomputed tensors where the
  backward is metered) and returns the parameter gradients through `torch.autograd.grad`, so
  they reach the parameters' AccumulateGrad nodes of the one backward pass DeepSpeed runs (no
  second backward pass whose gradient hooks DeepSpeed would see as a separate phase);
- the input is kept with ctx.save_for_backward (the meter sees it as the group's stash);
- the recompute runs with the RNG state the forward had, and the RNG state outside is left as it
  was (PipelineModule reseeds per layer inside the group, which would otherwise shift the
  stream): a checkpointed run computes the same numbers as one without.
"""

from __future__ import annotations

import torch
from torch import nn

CHECKPOINTABLE_LAYERS = ["DecoderLayer"]  # PipelineModule's checkpointable_layers (class names)


def checkpointed_groups(layer_classes: list[str], interval: int) -> list[tuple[int, int, bool]]:
    """(start, end, checkpointed) for each group of a stage's layer list (its layers' class
    names), as PipelineModule cuts and judges them with checkpointable_layers=CHECKPOINTABLE_LAYERS
    (`_is_checkpointable`: every layer of the group is one of those classes). interval 0: one
    group, not checkpointed. The memory planner (bll_bench/memory.py) cuts the same groups."""
    if interval <= 0:
        return [(0, len(layer_classes), False)]
    groups = []
    for start in range(0, len(layer_classes), interval):
        end = min(start + interval, len(layer_classes))
        groups.append((start, end, all(name in CHECKPOINTABLE_LAYERS for name in layer_classes[start:end])))
    return groups


def _rng_state(devices: list[torch.device]) -> tuple:
    cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices if d.type == "cuda"]
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in cuda:
        torch.cuda.set_rng_state(value, device)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, n_inputs: int, *inputs_and_params):
        inputs = inputs_and_params[:n_inputs]
        ctx.function, ctx.n_inputs = function, n_inputs
        ctx.params = inputs_and_params[n_inputs:]
        ctx.input_requires_grad = [torch.is_tensor(t) and t.requires_grad for t in inputs]
        ctx.devices = sorted({t.device for t in inputs if torch.is_tensor(t)}, key=str)
        ctx.rng = _rng_state(ctx.devices)
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return function(*inputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.input_requires_grad)]
        outside = _rng_state(ctx.devices)
        _set_rng_state(ctx.rng)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        finally:
            _set_rng_state(outside)
        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        roots = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        wrt = [t for t in inputs if t.requires_grad] + [p for p in ctx.params if p.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in roots], wrt, [g for _, g in roots], allow_unused=True)
                     if roots and wrt else [None] * len(wrt))
        input_grads = [next(grads) if t.requires_grad else None for t in inputs]
        param_grads = [next(grads) if p.requires_grad else None for p in ctx.params]
        return (None, None, *input_grads, *param_grads)


def checkpoint(function, *inputs, params=()):
    """function(*inputs), its activations recomputed in backward (module docstring). `params`:
    every trainable parameter `function` may use (extra ones get no gradient: harmless)."""
    if not torch.is_grad_enabled():
        return function(*inputs)
    params = [p for p in params if p.requires_grad]
    return _Checkpoint.apply(function, len(inputs), *inputs, *params)


class StageCheckpoint:
    """PipelineModule's activation_checkpoint_func for one stage: `checkpoint` with the trainable
    parameters of the stage's layers (module.forward_funcs; not the BLL feedback block, which is
    a submodule but no layer). DeepSpeed calls it as func(exec_range_func(start, end), *inputs)."""

    def __init__(self, layers):
        self.layers = layers  # the list object PipelineModule runs (forward_funcs)

    def params(self) -> list[torch.Tensor]:
        return [p for f in self.layers if isinstance(f, nn.Module) for p in f.parameters() if p.requires_grad]

    def __call__(self, function, *inputs):
        return checkpoint(function, *inputs, params=self.params())


def run_layers(layers: list[nn.Module], x, interval: int):
    """The stage forward of the one-process emulator: PipelineModule's grouping and checkpoint."""
    for start, end, checkpointed in checkpointed_groups([type(f).__name__ for f in layers], interval):
        group = layers[start:end]

        def run(h, group=group):
            for layer in group:
                h = layer(h)
            return h
        x = checkpoint(run, x, params=[p for f in group for p in f.parameters()]) if checkpointed else run(x)
    return x
