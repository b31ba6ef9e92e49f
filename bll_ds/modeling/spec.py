"""Model specs: Hugging Face config JSON files for the GPT-2 and Llama families.

A spec is exactly what `transformers` would write as `config.json`, so a trained model exports
to a standard HF folder and any HF config of these families can be trained here. Two fields are
imposed at load time, because the pipeline depends on them:

- `_attn_implementation = "sdpa"`: a decoder block called outside its HF model gets no causal
  mask from the model. SDPA with no mask takes its `is_causal` path; eager attention would
  silently let positions see the future (tests/test_modeling.py checks causality).
- `vocab_size` is set from the run's tokenizer (the spec's value is a placeholder).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from bll_ds.infra.errors import UserError

SUPPORTED_FAMILIES = {"gpt2": GPT2Config, "llama": LlamaConfig}


def load_model_spec(path: str | Path, vocab_size: int | None = None) -> PretrainedConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model spec {path} does not exist.",
                        "pass --model models/<name>.json (see models/ for the named specs).")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"model spec {path} is not valid JSON ({err}).",
                        "fix the file; it must be a Hugging Face config.json.") from None
    family = raw.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"model spec {path} has model_type={family!r}.",
                        f"use one of {sorted(SUPPORTED_FAMILIES)}.")
    if vocab_size is not None:
        raw["vocab_size"] = vocab_size
    config = SUPPORTED_FAMILIES[family](**{k: v for k, v in raw.items() if not k.startswith("_")})
    if config.tie_word_embeddings:
        raise UserError(
            f"model spec {path} ties the input and output embeddings.",
            "set \"tie_word_embeddings\": false. Tying couples the first and last pipeline stages "
            "through a cross-stage gradient all-reduce, which block-local learning must not use; "
            "backprop runs use the same untied model so that comparisons are fair.")
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config

