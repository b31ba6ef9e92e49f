"""Build the pipeline engine for a run.

`deepspeed.initialize` always constructs the stock PipelineEngine, so the engine class is
constructed here the same way `deepspeed.initialize` does it (same config class, same mpu from
the PipelineModule), only with our subclass.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed.runtime.config import DeepSpeedConfig
from torch import nn

from bll_ds.bll.feedback import build_feedback
from bll_ds.bll.variants import TABLE_VARIANTS
from bll_ds.engine.bll_engine import BLLPipelineEngine, StageLocalGrid, singleton_groups
from bll_ds.engine.pipeline_engine import AccountedPipelineEngine

FEEDBACK_SEED_OFFSET = 1_000_000  # feedback blocks are seeded apart from every forward layer


def weight_decay_groups(module: nn.Module) -> list[dict]:
    """Decay matrices and embeddings only; biases and norm gains are not decayed (as nanoGPT and
    most LLM recipes do). Groups without an explicit weight_decay take the DeepSpeed config's."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(method: str, module, ds_config: dict, model_config=None, seed: int = 0,
                 bll_variant: str = "prototype", guard_weight: float = 1.0, learn_variance: bool = False,
                 readout_max_logits_mb: float = 0.0):
    grid = module.mpu()
    engine_kwargs = {}
    if method == "bll":
        stage, last = grid.get_stage_id(), grid.get_pipe_parallel_world_size() - 1
        feedback = None
        if stage < last:
            torch.manual_seed(seed + FEEDBACK_SEED_OFFSET + stage)
            feedback = build_feedback(bll_variant, model_config, guard_weight, learn_variance)
            # A submodule of the stage's module: DeepSpeed's optimizer, precision casts and
            # ZeRO sharding see its parameters like any other. (Its weights are checkpointed by
            # bll_ds.checkpoint, since DeepSpeed saves pipeline layers only.)
            module.add_module("bll_feedback", feedback)
        table_shape = ((model_config.vocab_size, model_config.hidden_size)
                       if bll_variant in TABLE_VARIANTS else None)
        engine_kwargs = dict(feedback=feedback, table_shape=table_shape, variant=bll_variant,
                             readout_max_logits_mb=readout_max_logits_mb)
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
    config_class = DeepSpeedConfig(ds_config, grid)
    deepspeed.set_optimizer_flags(config_class, module)
    engine_class = BLLPipelineEngine if method == "bll" else AccountedPipelineEngine
    engine = engine_class(args=None, model=module, model_parameters=weight_decay_groups(module),
                          mpu=grid, config=ds_config, config_class=config_class, seed=seed, **engine_kwargs)
    engine._configure_python_gc()
    return engine
