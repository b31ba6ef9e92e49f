"""Model specs -> pipeline layers (HF transformers blocks) -> DeepSpeed PipelineModule."""

from bll_ds.modeling.layers import DecoderLayer, OutputHead, TokenEmbedding, lm_loss
from bll_ds.modeling.pipeline import (build_pipeline_module, build_sequential, check_stages,
                                      count_parameters, load_hf_state_dict, stage_layer_counts,
                                      to_hf_state_dict)
from bll_ds.modeling.spec import load_model_spec

__all__ = ["DecoderLayer", "OutputHead", "TokenEmbedding", "lm_loss", "build_pipeline_module",
           "build_sequential", "check_stages", "count_parameters", "load_hf_state_dict",
           "stage_layer_counts", "to_hf_state_dict", "load_model_spec"]
