"""The one-process pipeline emulator: an S-stage run in one process, on one device.

`python scripts/pretrain.py --emulate --stages S ...` trains the same S-stage model as a launch of
S ranks, with the same semantics, so that depth sweeps (8, 16 stages) need neither S processes on
a few cores nor S GPUs:

- the same layers per stage, initial weights, micro-batches and targets (train.py's sampler);
- per stage: its own optimizer, learning-rate schedule, clipping norm, RNG stream and non-finite
  verdict (emulated_stage.py);
- block-local learning runs every stage through block_local_stage.py's BlockLocalStage, the code
  the launched engine runs, with the emulated stage as its compute and this file's transport
  (EmulatedChannel), which passes the tables with feedback_channel.py's LAG: stage k uses
  P_{max(t - LAG, 0)} of stage k+1 (of the last stage, for direct feedback) during its step t
  (rounded down to the refresh grid);
- `--method bp` is pipeline backprop as DeepSpeed's 1F1B computes it: one autograd graph through
  all stages per micro-batch, every stage clipped by the global norm and stepped together.

The object has the engine interface train.py drives (train_steps, eval_batch, start_feedback,
save_checkpoint, load_checkpoint), so the run dir is the launcher's: metrics, per-stage logs,
summary.json, and checkpoints with DeepSpeed's per-layer weight files, which evaluate, export and
generate read unchanged. What is not emulated: data parallelism (one replica per stage) and time
(stages run one after another; tokens/s is the whole pipeline's work on one device).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bll_ds.method.stage_step import StageStep, run_step_end
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling.layers import lm_loss
from bll_ds.modeling.pipeline import build_stage_layers
from bll_ds.pipeline.accounting import tensor_bytes
from bll_ds.pipeline.block_local_stage import BlockLocalStage
from bll_ds.pipeline.build import build_stage_feedback
from bll_ds.pipeline.emulated.emulated_stage import EmulatedStage
from bll_ds.pipeline.feedback_channel import table_index
from bll_ds.pipeline.step_record import StepRecord, snapshot, update_norm
from bll_ds.run import run_dir as names

EMULATOR_STATE = "emulator_state.pt"


class _OneRankGrid:
    """The launched engines' grid, as train.py asks it: one replica, and this process logs."""
    data_parallel_id = 0

    @staticmethod
    def stage_to_global(stage: int, data: int = 0) -> int:
        return 0


def emulation_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EmulatedPipeline:
    grid = _OneRankGrid()

    def __init__(self, method: str, model_config, stages: int, ds, seed: int, bll,
                 activation_checkpoint_interval: int = 0):
        """activation_checkpoint_interval: as build_pipeline_module's, per stage (emulated_stage.py)."""
        self.method, self.num_stages, self.bll = method, stages, bll
        self.device = emulation_device()
        self.micro_batches = ds.micro_batches
        variant = get_variant(bll.variant) if method == "bll" else None
        self.variant = variant
        self.sends_table = variant is not None and variant.message_shape(model_config) is not None
        self.table_refresh = variant.table_refresh() if variant is not None else 1
        self.stages, self.block_stages = [], []
        for k in range(stages):
            feedback = build_stage_feedback(variant, model_config, k, stages, seed) if method == "bll" else None
            stage = EmulatedStage(k, build_stage_layers(model_config, stages, k, seed), feedback, ds.config, ds.micro_batches,
                                  self.device, ds.bf16, seed, activation_checkpoint_interval,
                                  grad_accum_dtype=ds.grad_accum_dtype, communication_dtype=ds.communication_dtype)
            stage.lm_loss = stage.fault.wrap(lm_loss, lambda stage=stage: stage.step)
            self.stages.append(stage)
            if method == "bll":
                if feedback is not None:
                    feedback.local_loss = stage.fault.wrap(feedback.local_loss, lambda stage=stage: stage.step)
                step = StageStep(feedback, stage.lm_loss, k == stages - 1, bll.readout_max_logits_mb, variant)
                self.block_stages.append(BlockLocalStage(step, stage.module.layers, k == stages - 1, self.table_refresh,
                                                         stage, EmulatedChannel(self, stage)))
        self.last = self.stages[-1]
        # tables[k]: stage k's published tables {j: P_j} that stage k-1 may still need
        self.tables: list[dict[int, torch.Tensor]] = [{} for _ in range(stages)]

    # ---- what train.py reads as "this rank's stage": the last one, which carries the LM loss ----
    @property
    def stage_id(self) -> int:
        return self.num_stages - 1

    @property
    def local_stages(self) -> list[int]:
        return list(range(self.num_stages))

    @property
    def accounting(self):
        return self.last.accounting

    @property
    def tracer(self):
        return self.last.tracer

    @tracer.setter
    def tracer(self, value):
        self.last.tracer = value

    @property
    def module(self):
        return self.last.module

    @property
    def skipped_steps(self) -> int:
        return self.last.skipped_steps

    def stage_views(self) -> list[EmulatedStage]:
        """Every stage, for summary.json's stages_detail."""
        return self.stages

    def start_feedback(self, resumed_step: int) -> None:
        """Fresh run: the initial tables P_0, last stage first, as the launched stages chain them."""
        for block_stage in reversed(self.block_stages):
            block_stage.start(resumed_step)

    # ---- training ----------------------------------------------------------------------------------
    def train_steps(self, first_step: int, num_steps: int, batch_fn, track_update_at=(), on_step=None) -> dict[int, list]:
        """Steps first_step+1 .. first_step+num_steps; returns every stage's StepRecords.
        on_step(record): called with the last stage's record as each step ends."""
        for stage in self.stages:
            stage.module.train()
        for block_stage in self.block_stages:
            block_stage.track_update_at = set(track_update_at)
        records = {k: [] for k in self.local_stages}
        step_fn = self._bll_step if self.method == "bll" else self._bp_step
        for step in range(first_step + 1, first_step + num_steps + 1):
            start = self.last.accounting.now()
            for k, record in enumerate(step_fn(step, batch_fn, start, step in track_update_at)):
                records[k].append(record)
            if on_step is not None:
                on_step(records[self.last.stage_id][-1])
        return records

    def _micro_batch(self, step: int, m: int, batch_fn):
        inputs, labels = batch_fn(step - 1, m, self.micro_batches)
        return inputs.to(self.device), labels.to(self.device)

    def _bll_step(self, step: int, batch_fn, start: float, tracked: bool) -> list[StepRecord]:
        for block_stage in self.block_stages:
            block_stage.begin(step)
        for m in range(self.micro_batches):
            x, labels = self._micro_batch(step, m, batch_fn)
            for stage, block_stage in zip(self.stages, self.block_stages):
                with stage.running():
                    inputs, outputs = x, stage.forward(x)
                    if stage is not self.last:
                        x = outputs.detach()  # what the launched stage sends: no gradient goes back
                        stage.accounting.count("acts_sent", tensor_bytes(x), "bytes_down")
                    if stage.stage_id > 0:
                        stage.accounting.count("acts_received")
                    block_stage.local_backward(outputs, labels, inputs)
        for stage, block_stage in zip(self.stages, self.block_stages):
            with stage.running():
                run_step_end(block_stage.step_end())
        step_s = self.last.accounting.now() - start
        return [block_stage.record(step_s, stage.accounting.end_step(stage.busy_s)[0], 0.0)
                for stage, block_stage in zip(self.stages, self.block_stages)]

    def _bp_step(self, step: int, batch_fn, start: float, tracked: bool) -> list[StepRecord]:
        """One graph per micro-batch through every stage; the last stage's loss / M back-propagated."""
        for stage in self.stages:
            stage.begin_step(step)
        before = [snapshot(stage.masters) for stage in self.stages] if tracked else None
        losses = []
        for m in range(self.micro_batches):
            x, labels = self._micro_batch(step, m, batch_fn)
            for stage in self.stages:
                with stage.running():
                    x = stage.forward(x)
                if stage is not self.last:
                    stage.accounting.count("acts_sent", tensor_bytes(x), "bytes_down")
                    self.stages[stage.stage_id + 1].accounting.count("grads_sent", tensor_bytes(x), "bytes_up")
            with self.last.running():
                loss = self.last.lm_loss(x, labels)
                losses.append(loss.detach().float())
                (loss / self.micro_batches).backward()
            for stage in self.stages:
                stage.accumulate_grads()
        # The launched stages agree on one verdict and clip by one norm (model-parallel group = all).
        cause = self.last.nonfinite_cause(losses) or next(
            (c for s in self.stages[:-1] if (c := s.nonfinite_cause([]))), None)
        if not cause:
            for stage in self.stages:
                stage.all_reduce_grads()
        norm = None if cause else sum(s.grad_square_norm() for s in self.stages).sqrt()
        for stage in self.stages:
            with stage.running():
                stage.skip_step() if cause else stage.clip_and_step(norm)
        step_s = self.last.accounting.now() - start
        loss = torch.stack(losses).mean().item()
        return [StepRecord(step=step, loss=loss, step_s=step_s, busy_s=stage.accounting.end_step(stage.busy_s)[0],
                           idle_s=0.0, lr=stage.lr(), grad_norm=None if cause else float(norm),
                           update_norm=update_norm(before[k], stage.masters) if before and not cause else None,
                           nonfinite=cause)
                for k, stage in enumerate(self.stages)]

    @torch.no_grad()
    def eval_batch(self, batches, num_micro_batches: int) -> float:
        """Mean held-out loss of the full forward network, one micro-batch at a time."""
        for stage in self.stages:
            stage.module.eval()
        losses = []
        for inputs, labels in batches:
            x = inputs.to(self.device)
            for stage in self.stages:
                x = stage.forward(x)
            losses.append(lm_loss(x, labels.to(self.device)).float())
        return torch.stack(losses).mean().item()

    def drain(self, completed_step: int) -> None:
        """Nothing is ever in flight."""

    # ---- checkpoints: DeepSpeed's layer files, so that use.py reads an emulated run unchanged ----
    def extra_state(self):
        return None  # written by save_checkpoint itself, for every stage

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        folder = Path(ckpt_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        for stage in self.stages:
            for index, layer in zip(stage.layer_index, stage.module.layers):
                torch.save({k: v.detach().clone() for k, v in layer.state_dict().items()},
                           folder / names.layer_weights(index))
            if self.method == "bll":
                source = self.variant.message_source(stage.stage_id, self.num_stages)
                inbox = self.tables[source] if source is not None else {}
                torch.save({"feedback": stage.feedback.state_dict() if stage.feedback is not None else None,
                            "inbox": {"queue": [(j, t.cpu()) for j, t in sorted(inbox.items())]}},
                           folder / names.block_local_state(stage.stage_id))
        torch.save({"client_state": client_state, "stages": [s.state_dict() for s in self.stages],
                    "own_tables": {k: [(j, t.cpu()) for j, t in sorted(h.items())] for k, h in enumerate(self.tables)}},
                   folder / EMULATOR_STATE)

    def load_checkpoint(self, ckpt_dir: str, tag: str, **_) -> tuple[str | None, dict | None]:
        folder = Path(ckpt_dir) / tag
        if not (folder / EMULATOR_STATE).is_file():
            return None, None
        state = torch.load(folder / EMULATOR_STATE, map_location="cpu", weights_only=False)
        for stage, stage_state in zip(self.stages, state["stages"]):
            for index, layer in zip(stage.layer_index, stage.module.layers):
                layer.load_state_dict(torch.load(folder / names.layer_weights(index), map_location="cpu",
                                                 weights_only=True))
            if stage.feedback is not None:
                block = torch.load(folder / names.block_local_state(stage.stage_id), map_location="cpu",
                                   weights_only=False)
                stage.feedback.load_state_dict(block["feedback"])
            stage.load_state_dict(stage_state)
        self.tables = [{j: t.to(self.device) for j, t in state["own_tables"].get(k, [])}
                       for k in range(self.num_stages)]
        return str(folder), state["client_state"]


class EmulatedChannel:
    """Stage k's messages in one process: its source's published tables (stage k+1's, or the last
    stage's for direct feedback: Variant.message_source), by the lag rule, and its own kept for
    the stages it sends to until the rule no longer asks for them (what a checkpoint saves)."""

    def __init__(self, pipeline: EmulatedPipeline, stage: EmulatedStage):
        self.pipeline, self.stage = pipeline, stage
        stages, k = pipeline.num_stages, stage.stage_id
        self.source = pipeline.variant.message_source(k, stages) if pipeline.sends_table else None
        self.destinations = pipeline.variant.message_destinations(k, stages) if pipeline.sends_table else []
        self.receives, self.sends = self.source is not None, bool(self.destinations)

    def table_for_step(self, step: int) -> torch.Tensor:
        self.stage.accounting.count("tables_received")
        return self.pipeline.tables[self.source][table_index(step, self.pipeline.table_refresh)]

    def publish(self, table: torch.Tensor, completed_step: int) -> None:
        table = table.detach().clone()
        history = self.pipeline.tables[self.stage.stage_id]
        history[completed_step] = table
        for old in [j for j in history if j < table_index(completed_step + 1, self.pipeline.table_refresh)]:
            del history[old]
        for _ in self.destinations:  # one send per receiving stage, as the launched stage makes
            self.stage.accounting.count("tables_sent", tensor_bytes(table), "bytes_up")

    def resume(self, completed_step: int) -> None:
        """The tables come back with the checkpoint (load_checkpoint)."""
