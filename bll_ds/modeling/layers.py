"""Pipeline layers built from Hugging Face `transformers` modules.

A causal LM is cut into a flat list of layers: [TokenEmbedding, DecoderLayer x L, OutputHead].
Each layer maps one tensor to one tensor (token ids -> hidden -> ... -> logits), which is what
DeepSpeed's PipelineModule passes between stages. The decoder blocks are the real HF classes
(`GPT2Block`, `LlamaDecoderLayer`); the embedding and head hold HF-named submodules, and each
layer knows the HF name of every parameter it owns (`hf_key`), so a trained pipeline exports to
a standard HF checkpoint and an HF checkpoint loads into the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaRMSNorm,
                                                      LlamaRotaryEmbedding)

from bll_ds.modeling.init import init_like_hf


class TokenEmbedding(nn.Module):
    """Token ids [B, T] -> hidden [B, T, H]. GPT-2 adds learned absolute positions here;
    Llama's rotary positions are applied inside every decoder layer instead."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.family = config.model_type
        if self.family == "gpt2":
            self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.drop = nn.Dropout(config.embd_pdrop)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        init_like_hf(self, config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            return self.drop(self.wte(input_ids) + self.wpe(positions))
        return self.embed_tokens(input_ids)

    def hf_key(self, local_key: str) -> str:
        return ("transformer." if self.family == "gpt2" else "model.") + local_key


class DecoderLayer(nn.Module):
    """One HF decoder block, causal by construction.

    No attention mask is passed: with `_attn_implementation == "sdpa"` (forced by the spec
    loader) and no mask, HF's SDPA path sets `is_causal=True`. `tests/test_modeling.py` checks
    that outputs at position t have exactly zero gradient with respect to inputs after t.
    """

    def __init__(self, config: PretrainedConfig, layer_idx: int):
        super().__init__()
        if config._attn_implementation != "sdpa":
            raise ValueError("DecoderLayer needs config._attn_implementation == 'sdpa' to be causal "
                             "without a mask; load specs with bll_ds.modeling.load_model_spec.")
        self.family = config.model_type
        self.layer_idx = layer_idx
        if self.family == "gpt2":
            self.block = GPT2Block(config, layer_idx=layer_idx)
        else:
            self.block = LlamaDecoderLayer(config, layer_idx=layer_idx)
            self._rope = _RotaryTable(config)
        init_like_hf(self, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            out = self.block(hidden)
        else:
            seq_len = hidden.shape[1]
            positions = torch.arange(seq_len, device=hidden.device).unsqueeze(0)
            out = self.block(hidden, position_ids=positions,
                             position_embeddings=self._rope(seq_len, hidden.device, hidden.dtype))
        return out[0] if isinstance(out, tuple) else out

    def hf_key(self, local_key: str) -> str:
        stem = f"transformer.h.{self.layer_idx}." if self.family == "gpt2" else f"model.layers.{self.layer_idx}."
        return stem + local_key.removeprefix("block.")


class OutputHead(nn.Module):
    """Final norm and LM head: hidden [B, T, H] -> logits [B, T, V]."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.family = config.model_type
        if self.family == "gpt2":
            self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        else:
            self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        init_like_hf(self, config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.ln_f if self.family == "gpt2" else self.norm
        return self.lm_head(norm(hidden))

    def hf_key(self, local_key: str) -> str:
        if local_key.startswith("lm_head."):
            return local_key
        return ("transformer." if self.family == "gpt2" else "model.") + local_key


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (bf16 log-softmax over a large vocab loses bits)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


class _RotaryTable:
    """Rotary cos/sin tables, computed in fp32 and cached per (length, device, dtype).

    Deliberately not an nn.Module: DeepSpeed casts every floating buffer of the model to bf16,
    and bf16 inverse frequencies would corrupt positions beyond a few hundred tokens.
    """

    def __init__(self, config: PretrainedConfig):
        self._rotary = LlamaRotaryEmbedding(config)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        key = (seq_len, str(device), dtype)
        if key not in self._cache:
            probe = torch.empty(0, dtype=torch.float32)
            cos, sin = self._rotary(probe, torch.arange(seq_len).unsqueeze(0))
            self._cache[key] = (cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype))
        return self._cache[key]
