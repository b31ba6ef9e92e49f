"""Build the pipeline engine for a run: the stage's feedback block (block-local learning), the
stage-local grid, DeepSpeed's model-parallel flags, and the engine itself (constructed by hand in
deepspeed_internals.py, since `deepspeed.initialize` always builds the stock PipelineEngine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bll_ds.method.feedback import StageFeedback
from bll_ds.method.variants import Variant
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling.pipeline import build_stage_layers, stage_layer_counts
from bll_ds.pipeline.launched import deepspeed_internals as ds_internals
from bll_ds.pipeline.launched.bll_engine import BLLPipelineEngine, StageLocalGrid, singleton_groups
from bll_ds.pipeline.launched.pipeline_engine import AccountedPipelineEngine
from bll_ds.run.config import BLLConfig

FEEDBACK_SEED_OFFSET = 1_000_000  # feedback blocks are seeded apart from every forward layer


def weight_decay_groups(module: nn.Module) -> list[dict]:
    """Decay matrices and embeddings only; biases and norm gains are not decayed (as nanoGPT and
    most LLM recipes do). Groups without an explicit weight_decay take the DeepSpeed config's."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_stage_feedback(variant: Variant, model_config, stage: int, stages: int, seed: int):
    """Stage `stage`'s feedback block, seeded apart from every layer, or None where the stage
    holds none (Variant.holds_block). `variant`: the run's Variant (method/variants.py get),
    resolved once by the caller."""
    if not variant.holds_block(stage, stages):
        return None
    torch.manual_seed(seed + FEEDBACK_SEED_OFFSET + stage)
    return variant.build(model_config, input_critic=variant.trains_input_critic and stage > 0,
                         last=stage == stages - 1)


@dataclass
class Stage:
    """One stage of an S-stage pipeline built in this process alone (the scale rehearsal and the
    stage-step tests): its layers with the pipeline's initial weights and its feedback block."""
    module: nn.Sequential        # the stage's pipeline layers, feedback block attached as "bll_feedback"
    feedback: StageFeedback | None
    first: bool
    last: bool
    decoder_layers: int
    sends_tables: bool           # the variant's messages travel upstream (the engine's table_shape is set)
    variant: str = "prototype"

    def weights(self) -> list[torch.Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]


def build_stage(config, stages: int, stage: int, seed: int = 0, variant: str = "prototype") -> Stage:
    """Stage `stage` of an S-stage pipeline, with the same initial weights as the pipeline."""
    first, last = stage == 0, stage == stages - 1
    variant_class = get_variant(variant)
    module = nn.Sequential(*(layer for _, layer in build_stage_layers(config, stages, stage, seed)))
    feedback = build_stage_feedback(variant_class, config, stage, stages, seed)  # as build_engine
    if feedback is not None:
        module.add_module("bll_feedback", feedback)
    return Stage(module, feedback, first, last, stage_layer_counts(config, stages)[stage],
                 sends_tables=stages > 1 and variant_class.message_shape(config) is not None, variant=variant)


def forward_layers(stage: Stage, inputs: torch.Tensor) -> torch.Tensor:
    """The pipeline layers only (not the feedback block, which is a submodule but no layer)."""
    out = inputs
    for name, layer in stage.module.named_children():
        if name != "bll_feedback":
            out = layer(out)
    return out


def build_engine(method: str, module, ds_config: dict, model_config=None, seed: int = 0,
                 bll: BLLConfig | None = None):
    """`bll`: the run's BLL section (method "bll" only; default BLLConfig())."""
    ds_internals.check_deepspeed()  # before any group is created: a mismatch names the member
    grid = module.mpu()
    engine_kwargs = {}
    if method == "bll":
        bll = bll or BLLConfig()
        variant = get_variant(bll.variant)
        stage, last = grid.get_stage_id(), grid.get_pipe_parallel_world_size() - 1
        feedback = build_stage_feedback(variant, model_config, stage, last + 1, seed)
        if feedback is not None:
            # A submodule of the stage's module: DeepSpeed's optimizer, precision casts and
            # ZeRO sharding see its parameters like any other. (Its weights are checkpointed by
            # bll_ds.run.checkpoint, since DeepSpeed saves pipeline layers only.)
            module.add_module("bll_feedback", feedback)
        engine_kwargs = dict(feedback=feedback, variant=variant, table_shape=variant.message_shape(model_config),
                             readout_max_logits_mb=bll.readout_max_logits_mb)
        grid = StageLocalGrid(grid, singleton_groups())
    # DeepSpeed's gradient-norm code (clipping; fp32 and ZeRO-1 paths) sums squared norms over the
    # model-parallel group but counts a parameter only on model-parallel rank 0 unless it is
    # flagged model-parallel. A pipeline's stages are different model-parallel ranks, so
    # unflagged, every stage would clip with stage 0's norm alone (docs/DEEPSPEED_NOTES.md;
    # tests/test_launcher.py::test_one_pipeline_step_equals_a_hand_computed_adamw_step). Flagged,
    # each stage counts its own parameters: the global norm for backprop, and with the
    # stage-local group of block-local learning, the stage's own norm.
    for param in module.parameters():
        param.model_parallel = True
    engine_class = BLLPipelineEngine if method == "bll" else AccountedPipelineEngine
    return ds_internals.construct_pipeline_engine(engine_class, module, grid, ds_config,
                                                  weight_decay_groups(module), seed=seed, **engine_kwargs)
