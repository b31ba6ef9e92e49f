"""Data for one run: corpus -> tokenizer -> cached token streams, done once on rank 0.

Rank 0 reads the corpus, trains (or reuses) the run's tokenizer and tokenizes into the shared
cache; every other rank then opens the same files. Ranks on other nodes must see the run dir and
the cache dir (a shared filesystem), as they must for DeepSpeed checkpoints anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bll_ds import distributed
from bll_ds.config import RunConfig
from bll_ds.data import (Tokenizer, build_tokenizer, load_corpus, open_stream, prepare_token_streams,
                         token_dtype)


@dataclass
class RunData:
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    corpus_name: str


def prepare_run_data(cfg: RunConfig, run_dir: Path) -> RunData:
    def on_rank0():
        corpus = load_corpus(cfg.data)
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = build_tokenizer(cfg.tokenizer, corpus.train, str(run_dir))
        streams = prepare_token_streams(corpus, tokenizer, cfg.cache_dir, num_proc=cfg.tokenize_workers)
        return dict(tokenizer_path=tokenizer.path, tokenizer_spec=tokenizer.spec, train=streams.train_path,
                    val=streams.val_path, corpus_name=corpus.name)

    paths = distributed.rank0_then_broadcast(on_rank0)
    tokenizer = Tokenizer(paths["tokenizer_path"], spec=paths["tokenizer_spec"])
    dtype = token_dtype(tokenizer.vocab_size)
    return RunData(tokenizer=tokenizer, train_tokens=open_stream(paths["train"], dtype),
                   val_tokens=open_stream(paths["val"], dtype), corpus_name=paths["corpus_name"])
