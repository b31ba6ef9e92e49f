"""What a stage does, instruction by instruction, over a short window of training steps.

Two measurements, both taken on a few steps only (see RunConfig.trace_steps) so that normal
steps pay nothing:
- a timeline: every pipeline instruction's start and end on the machine's monotonic clock (one
  clock for every process on a host, so the stages' timelines line up; on CUDA read after a
  device synchronization, so an instruction's span is its kernels', not their launch), written to
  timeline_stage{k}.json. The benchmark plots it and derives the simulator's per-stage costs.
- the saved-activation peak: bytes of tensors autograd holds for backward (parameters excluded),
  live at once. That is the activation stash in the sense of the 1F1B literature, measured
  exactly, where process RSS would mix it with allocator caches and the runtime.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path

import torch

from bll_ds.pipeline.device_timer import timer_for
from bll_ds.run import run_dir as names

# Instructions whose forward computation saves tensors for backward: metered.
SAVES_ACTIVATIONS = {"ForwardPass", "ForwardBLL", "LocalBackward", "FinishStep"}


class SavedActivationMeter:
    """Live and peak bytes of the storages autograd saves for backward.

    The pack hook wraps each saved tensor in a handle; autograd drops the handle when it frees
    the graph (after backward), which releases the bytes. A storage saved several times (views,
    the same input to several ops) counts once.
    """

    def __init__(self):
        self.excluded: set[int] = set()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, saves alive]

    def exclude(self, tensors) -> None:
        """Parameters and persistent buffers are weights, not activations."""
        self.excluded.update(t.untyped_storage().data_ptr() for t in tensors)

    @contextlib.contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            yield

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return tensor
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [storage.nbytes(), 0]
            self.live_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[1] += 1
        return _SavedHandle(tensor, self, key)

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._refs[key]


class _SavedHandle:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor, meter: SavedActivationMeter, key: int):
        self.tensor = tensor
        weakref.finalize(self, meter._release, key)


def _unpack(saved):
    return saved.tensor if isinstance(saved, _SavedHandle) else saved


class StageTracer:
    """Records instructions of the steps in `steps`; meters saved activations on the first one
    only (the hooks cost a Python call per saved tensor, which would inflate the timed steps of a
    small model)."""

    def __init__(self, stage: int, steps: range, device=None):
        self.stage = stage
        self.steps = steps
        self.timer = timer_for(device)
        self.step: int | None = None
        self.events: list[tuple[str, int, float, float]] = []
        self.meter = SavedActivationMeter()
        self._meter_ready = False

    def set_step(self, step: int | None, weights=lambda: ()) -> None:
        """`weights`: a callable returning the stage's weight tensors, called once, at the first
        traced step (after ZeRO has moved parameters into its flat buffers at optimizer set-up)."""
        self.step = step
        if step is not None and step in self.steps and not self._meter_ready:
            self.meter.exclude(weights())
            self._meter_ready = True

    def run(self, name: str, fn):
        if self.step is None or self.step not in self.steps:
            return fn()
        metered = name in SAVES_ACTIVATIONS and self.step == self.steps.start
        start = self.timer.now()
        with self.meter.hooks() if metered else contextlib.nullcontext():
            out = fn()
        self.events.append((name, self.step, start, self.timer.now()))
        return out

    @property
    def activation_peak_mb(self) -> float | None:
        return round(self.meter.peak_bytes / 2**20, 2) if self._meter_ready else None

    def dump(self, run_dir: Path) -> None:
        names.timeline(run_dir, self.stage).write_text(json.dumps({"stage": self.stage, "clock": "time.monotonic",
                                    "steps": [self.steps.start, self.steps.stop - 1],
                                    "events": [{"op": n, "step": s, "start": a, "end": b}
                                               for n, s, a, b in self.events]}))


def read_timelines(run_dir: Path) -> list[dict]:
    """Every stage's timeline of a run, stage 0 first (empty when the run traced nothing)."""
    return [json.loads(path.read_text()) for path in names.timelines(run_dir)]


def traced(instruction_map: dict) -> dict:
    """The same instruction map, each entry run through the engine's tracer."""
    def wrap(name, fn):
        def run(self, *args, **kwargs):
            return self.tracer.run(name, lambda: fn(self, *args, **kwargs))
        run.__name__ = fn.__name__
        return run
    return {cls: wrap(cls.__name__, fn) for cls, fn in instruction_map.items()}
