"""Build the pipeline engine for a run.

`deepspeed.initialize` always constructs the stock PipelineEngine, so the engine class is
constructed here the same way `deepspeed.initialize` does it (same config class, same mpu from
the PipelineModule), only with our subclass.
"""

from __future__ import annotations

import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig
from torch import nn

from bll_ds.engine.pipeline_engine import AccountedPipelineEngine

ENGINES = {"bp": AccountedPipelineEngine}


def weight_decay_groups(module: nn.Module) -> list[dict]:
    """Decay matrices and embeddings only; biases and norm gains are not decayed (as nanoGPT and
    most LLM recipes do). Groups without an explicit weight_decay take the DeepSpeed config's."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(method: str, module, ds_config: dict):
    mpu = module.mpu()
    config_class = DeepSpeedConfig(ds_config, mpu)
    deepspeed.set_optimizer_flags(config_class, module)
    engine = ENGINES[method](args=None, model=module, model_parameters=weight_decay_groups(module),
                             mpu=mpu, config=ds_config, config_class=config_class)
    engine._configure_python_gc()
    return engine
