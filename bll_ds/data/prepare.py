"""Data for one run, done once on rank 0: corpus -> tokenizer -> cached token streams, or a
prepared tokens folder (``--data tokens:DIR``).

In-memory path (any other --data): rank 0 reads the corpus, trains (or reuses) the run's
tokenizer and tokenizes into the shared cache; every other rank then opens the same files. Ranks
on other nodes must see the run dir and the cache dir (a shared filesystem), as they must for
DeepSpeed checkpoints anyway. The whole corpus passes through rank 0's memory, so this suits
corpora up to a few GB.

``tokens:DIR`` (written once by ``python -m bll_ds.data.prepare_tokens``, any size): no corpus is
read and no tokenizer is trained. Rank 0 checks DIR (manifest, shard sizes, tokenizer fingerprint:
bll_ds/data/shards.py) and installs DIR's tokenizer as the run's tokenizer (``tokenizer.model`` or
``hf_tokenizer/`` in the run dir, as a trained one is saved, so evaluate/export/generate and resume
find it); every rank maps DIR's shards (`ShardedTokens`). ``--tokenizer`` is ignored then, except
that a tokenizer *file or folder* passed there must be DIR's own (same fingerprint), else the run
stops: a mismatch means the flags describe another experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bll_ds.infra import distributed
from bll_ds.run.config import RunConfig
from bll_ds.data import (Tokenizer, build_tokenizer, load_corpus, open_stream, prepare_token_streams,
                         token_dtype)
from bll_ds.data.shards import ShardedTokens, check_tokenizer_flag, is_token_dir_spec, open_token_dir
from bll_ds.data.tokenizer import adopt_tokenizer, open_tokenizer


@dataclass
class RunData:
    tokenizer: Tokenizer  # or a bll_ds.data.hf_tokenizer.HFTokenizer (same interface)
    train_tokens: np.ndarray | ShardedTokens
    val_tokens: np.ndarray | ShardedTokens
    corpus_name: str


def prepare_run_data(cfg: RunConfig, run_dir: Path) -> RunData:
    if is_token_dir_spec(cfg.data):
        return _prepared_run_data(cfg, run_dir)

    def on_rank0():
        corpus = load_corpus(cfg.data, text_field=cfg.text_field)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Said before it happens: tokenizer training and tokenization take tens of seconds on a
        # large corpus, the first time (both are cached after).
        print(f"bll-ds: data {cfg.data or 'the standard library sources'}: {len(corpus.train):,} training / {len(corpus.val):,} held-out documents; "
              f"tokenizer {cfg.tokenizer}, then tokenizing (cached in {cfg.cache_dir})", flush=True)
        tokenizer = build_tokenizer(cfg.tokenizer, corpus.train, str(run_dir), cache_dir=cfg.cache_dir)
        streams = prepare_token_streams(corpus, tokenizer, cfg.cache_dir, num_proc=cfg.tokenize_workers)
        return dict(tokenizer_path=tokenizer.path, tokenizer_spec=tokenizer.spec, train=streams.train_path,
                    val=streams.val_path, corpus_name=corpus.name)

    paths = distributed.rank0_then_broadcast(on_rank0)
    tokenizer = open_tokenizer(paths["tokenizer_path"], spec=paths["tokenizer_spec"])
    dtype = token_dtype(tokenizer.vocab_size)
    return RunData(tokenizer=tokenizer, train_tokens=open_stream(paths["train"], dtype),
                   val_tokens=open_stream(paths["val"], dtype), corpus_name=paths["corpus_name"])


def _prepared_run_data(cfg: RunConfig, run_dir: Path) -> RunData:
    def on_rank0():
        token_dir = open_token_dir(cfg.data)  # verifies shards and tokenizer
        check_tokenizer_flag(cfg.tokenizer, token_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        info = token_dir.manifest["tokenizer"]
        tokenizer = adopt_tokenizer(open_tokenizer(token_dir.tokenizer_path, info["spec"]), str(run_dir), info["spec"])
        print(f"bll-ds: data {cfg.data}: {len(token_dir.train):,} train / {len(token_dir.val):,} val tokens in "
              f"{len(token_dir.train.paths) + len(token_dir.val.paths)} shards; tokenizer {info['spec']} "
              f"(vocab {tokenizer.vocab_size}) from that folder", flush=True)
        return dict(tokenizer_path=tokenizer.path, tokenizer_spec=tokenizer.spec, corpus_name=token_dir.name)

    paths = distributed.rank0_then_broadcast(on_rank0)
    tokenizer = open_tokenizer(paths["tokenizer_path"], spec=paths["tokenizer_spec"])
    token_dir = open_token_dir(cfg.data, verify=False)  # rank 0 verified it
    return RunData(tokenizer=tokenizer, train_tokens=token_dir.train, val_tokens=token_dir.val,
                   corpus_name=paths["corpus_name"])
