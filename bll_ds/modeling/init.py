"""Hugging Face initialisation for modules built outside their HF model.

HF initialises weights in `PreTrainedModel._init_weights`, a method that reads only
`self.config`. Pipeline layers are built one at a time on their own stage, never inside an HF
model, so we call that method through a parameter-free instance of the family's PreTrainedModel
class. The traversal is post-order (children first), as in HF's `initialize_weights`: GPT-2's
scaled residual-projection init on the attention/MLP module must override the plain Conv1D init
of its `c_proj` child, exactly as it does inside `GPT2LMHeadModel`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

_PRETRAINED_CLASS = {"gpt2": GPT2PreTrainedModel, "llama": LlamaPreTrainedModel}


@functools.lru_cache(maxsize=None)
def _initializer_class(family: str) -> type:
    base = _PRETRAINED_CLASS[family]

    class _Initializer(base):
        # Skip PreTrainedModel.__init__: it would build nothing we need and run post_init hooks.
        def __init__(self, config):  # noqa: D401 - not a real model
            nn.Module.__init__(self)
            self.config = config

    _Initializer.__name__ = f"{base.__name__}Initializer"
    return _Initializer


@torch.no_grad()
def init_like_hf(module: nn.Module, config: PretrainedConfig) -> None:
    initializer = _initializer_class(config.model_type)(config)
    for sub in _post_order(module):
        initializer._init_weights(sub)


def _post_order(module: nn.Module):
    for child in module.children():
        yield from _post_order(child)
    yield module
