"""The stage tracer: saved-activation bytes are counted exactly, and only traced steps record."""

import torch

from bll_ds.pipeline.trace import SavedActivationMeter, StageTracer, traced


def test_meter_counts_each_saved_storage_once_and_releases_after_backward():
    meter = SavedActivationMeter()
    x = torch.randn(1000, requires_grad=True)  # a leaf the caller holds: not saved by mul-by-scalar
    with meter.hooks():
        b = (x * 2).exp()   # exp saves its output b
        c = b.sin()         # sin saves its input: b again, the same storage
        d = c.exp()         # saves d
    assert meter.live_bytes == 2 * 1000 * 4
    assert meter.peak_bytes == 2 * 1000 * 4
    d.sum().backward()
    del b, c, d
    assert meter.live_bytes == 0
    assert meter.peak_bytes == 2 * 1000 * 4


def test_meter_excludes_weights():
    w = torch.nn.Parameter(torch.randn(64, 32))
    meter = SavedActivationMeter()
    meter.exclude([w])
    x = torch.randn(8, 64, requires_grad=True)
    with meter.hooks():
        y = x @ w  # saves x and w; only x is an activation
    assert meter.peak_bytes == 8 * 64 * 4
    y.sum().backward()


def test_meter_peak_tracks_graphs_alive_at_once():
    """Two micro-batches held before either backward (a 1F1B stash) peak at twice one."""
    meter = SavedActivationMeter()
    x1, x2 = torch.randn(500, requires_grad=True), torch.randn(500, requires_grad=True)
    with meter.hooks():
        y1 = x1.exp()
        y2 = x2.exp()
    assert meter.peak_bytes == 2 * 500 * 4
    y1.sum().backward()
    y2.sum().backward()
    del y1, y2
    with meter.hooks():
        y3 = x1.exp()
    assert meter.live_bytes == 500 * 4 and meter.peak_bytes == 2 * 500 * 4
    del y3


class _Engine:
    def __init__(self, steps):
        self.tracer = StageTracer(0, steps)
        self.calls = 0

    def forward(self, buffer_id):
        self.calls += 1
        return buffer_id


class ForwardPass:  # named like DeepSpeed's instruction: the tracer meters it
    pass


def test_only_traced_steps_record_events_and_the_first_is_metered():
    run = traced({ForwardPass: _Engine.forward})[ForwardPass]
    engine = _Engine(range(2, 4))
    for step in (1, 2, 3, 4):
        engine.tracer.set_step(step)
        assert run(engine, buffer_id=step) == step
    assert engine.calls == 4
    assert [(op, step) for op, step, _, _ in engine.tracer.events] == [("ForwardPass", 2), ("ForwardPass", 3)]
    assert all(end >= start for _, _, start, end in engine.tracer.events)
    assert engine.tracer.activation_peak_mb == 0.0  # metered, nothing saved
