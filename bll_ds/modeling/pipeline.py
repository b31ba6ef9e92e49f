"""Turn a model spec into a DeepSpeed PipelineModule (or the same layers as one nn.Sequential).

Layer i is built right after `torch.manual_seed(seed + i)`: DeepSpeed's `seed_layers` does this
inside PipelineModule, and `build_sequential` does the same, so a layer's initial weights depend
only on (spec, seed, i) -- not on the number of stages nor on which process builds it. That makes
1-, 2- and 4-stage runs start from the same model, and lets tests compare the stitched pipeline
with an HF model holding the same weights.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn
from transformers import PretrainedConfig

from bll_ds.infra.errors import UserError
from bll_ds.modeling.checkpointing import CHECKPOINTABLE_LAYERS, StageCheckpoint
from bll_ds.modeling.layers import DecoderLayer, OutputHead, TokenEmbedding, lm_loss

# Decoder blocks are balanced across stages; the embedding rides with the first stage and the
# head with the last (as in Megatron-DeepSpeed).
PARTITION_METHOD = "type:DecoderLayer"


def layer_specs(config: PretrainedConfig) -> list[LayerSpec]:
    return ([LayerSpec(TokenEmbedding, config)]
            + [LayerSpec(DecoderLayer, config, i) for i in range(config.num_hidden_layers)]
            + [LayerSpec(OutputHead, config)])


def check_stages(config: PretrainedConfig, stages: int) -> None:
    layers = config.num_hidden_layers
    if stages < 1 or layers < stages:
        raise UserError(f"the model has {layers} decoder layers, which cannot be cut into {stages} stages.",
                        f"use --stages between 1 and {layers}, or a deeper model spec.")


def stage_layer_counts(config: PretrainedConfig, stages: int) -> list[int]:
    """Decoder layers per stage under DeepSpeed's type-based partitioning (uniform counts,
    the remainder going to the first stages)."""
    check_stages(config, stages)
    base, extra = divmod(config.num_hidden_layers, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def build_pipeline_module(config: PretrainedConfig, stages: int, seed: int, topology=None,
                          activation_checkpoint_interval: int = 0) -> PipelineModule:
    """activation_checkpoint_interval c > 0: DeepSpeed's activation checkpointing, groups of c
    layers of the stage's layer list, only groups of DecoderLayers checkpointed, with
    bll_ds.modeling.checkpointing's function (see there why not DeepSpeed's default)."""
    check_stages(config, stages)
    if activation_checkpoint_interval < 0:
        raise UserError(f"--activation_checkpoint_interval is {activation_checkpoint_interval}.",
                        "pass 0 (off) or a positive number of layers per checkpointed group.")
    kwargs = dict(topology=topology) if topology is not None else dict(num_stages=stages)
    module = PipelineModule(layers=layer_specs(config), loss_fn=lm_loss,
                            partition_method=PARTITION_METHOD, seed_layers=True, base_seed=seed,
                            seed_fn=_seed_layer, activation_checkpoint_interval=0,
                            checkpointable_layers=list(CHECKPOINTABLE_LAYERS), **kwargs)
    if activation_checkpoint_interval:
        module.activation_checkpoint_func = StageCheckpoint(module.forward_funcs)
        # public: sets the interval and precomputes which groups are checkpointable, which
        # PipelineModule.forward needs (PipelineEngine does it too, but a bare module would
        # otherwise skip every group)
        module.set_checkpoint_interval(activation_checkpoint_interval)
    return module


def _seed_layer(seed) -> None:
    # DeepSpeed's default seeder passes a numpy integer (type-based partition bounds) to
    # random.seed, which Python 3.11 rejects; only torch's generator matters for weights.
    torch.manual_seed(int(seed))


def stage_layer_ranges(config: PretrainedConfig, stages: int) -> list[range]:
    """Per stage, the positions of its layers in `layer_specs(config)` (DeepSpeed's layer-file
    numbering): decoder layers cut as the type:DecoderLayer partition cuts them, the embedding
    with the first stage and the head with the last."""
    counts = stage_layer_counts(config, stages)
    bounds = [1 + sum(counts[:k]) for k in range(stages + 1)]
    bounds[0], bounds[-1] = 0, len(layer_specs(config))
    return [range(bounds[k], bounds[k + 1]) for k in range(stages)]


def build_stage_layers(config: PretrainedConfig, stages: int, stage: int, seed: int) -> list[tuple[int, nn.Module]]:
    """Stage `stage`'s layers and their positions in `layer_specs(config)`, with the pipeline's
    initial weights: layer i is built right after seeding with seed + i, as DeepSpeed's
    seed_layers does, so a stage's weights do not depend on which other layers are built."""
    specs = layer_specs(config)
    layers = []
    for i in stage_layer_ranges(config, stages)[stage]:
        torch.manual_seed(seed + i)
        layers.append((i, specs[i].build()))
    return layers


def build_sequential(config: PretrainedConfig, seed: int) -> nn.Sequential:
    """All layers in one process, with the same initial weights as the pipeline."""
    return nn.Sequential(*(layer for _, layer in build_stage_layers(config, 1, 0, seed)))


def to_hf_state_dict(layers: nn.Sequential) -> dict[str, torch.Tensor]:
    return {layer.hf_key(k): v for layer in layers for k, v in layer.state_dict().items()}


def load_hf_state_dict(layers: nn.Sequential, hf_state: dict[str, torch.Tensor]) -> None:
    for layer in layers:
        local = {k: hf_state[layer.hf_key(k)] for k in layer.state_dict()}
        layer.load_state_dict(local)


def count_parameters(config: PretrainedConfig) -> int:
    """Parameter count of the whole model, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for spec in layer_specs(config) for p in spec.build().parameters())
