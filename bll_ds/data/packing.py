"""Tokenize a corpus once into flat token streams cached on disk, and memory-map them.

Each split becomes one flat array: the tokens of every document, each followed by EOS, in corpus
order. Flat streams suit pretraining (nanoGPT's ``train.bin``): the sampler cuts fixed-length
windows anywhere, documents are packed with no padding, and EOS tells the model where one
document ends and the next begins.

The cache is keyed by (corpus.name, tokenizer.fingerprint, split) only. The issue asked for a
cache keyed by (data, tokenizer, seq_len); a seq_len-independent flat stream is a superset of that
-- windows of seq_len + 1 tokens are cut by the sampler at read time -- so changing seq_len reuses
the cache instead of re-tokenizing. Files are written to a temporary name and renamed into place
(`os.replace`), so a run killed mid-write leaves no half cache that a later run would trust.

Tokenization runs through ``datasets.Dataset.map`` (batched, `num_proc` worker processes), with
``keep_in_memory=True`` so nothing is written to the user's ``~/.cache/huggingface``. Documents
longer than `CHUNK_CHARS` are cut after a newline into several rows, so one huge file still
tokenizes in parallel and in bounded memory. The cut is invisible in the ids for ``char`` and
``bpe`` (no piece spans a newline: it is a user-defined symbol); for ``unigram``, ties between
equal-score segmentations may resolve differently than for the uncut text, which is harmless
(same text, same model score) and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from bll_ds.data.corpus import Corpus
from bll_ds.data.tokenizer import Tokenizer
from bll_ds.infra.atomic import atomic_path

CACHE_FORMAT_VERSION = 1
CHUNK_CHARS = 1_000_000
_MAP_BATCH_ROWS = 64


@dataclass
class TokenStreams:
    """Read-only memory maps of the train and val token streams (see module docstring)."""

    train: np.ndarray
    val: np.ndarray
    train_path: str
    val_path: str


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype that holds every id: uint16 halves disk and page-cache use for vocabularies
    up to 65536 (GPT-2's 50257 included)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def token_windows_available(n_tokens: int, seq_len: int) -> int:
    """How many training windows a stream of `n_tokens` holds without repeating a predicted token.

    A window is seq_len + 1 tokens (inputs are its first seq_len, labels its last seq_len);
    consecutive windows start seq_len apart, so their input spans (and their label spans) tile the
    stream without overlap and every token is predicted once: (n_tokens - 1) // seq_len.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(0, (n_tokens - 1) // seq_len)


def cache_path(cache_dir: str, corpus_name: str, tokenizer_fingerprint: str, split: str) -> str:
    key = json.dumps([CACHE_FORMAT_VERSION, corpus_name, tokenizer_fingerprint, split])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"tokens-{split}-{digest}.bin")


def prepare_token_streams(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str, num_proc: int = 2) -> TokenStreams:
    """Tokenize both splits into `cache_dir` (or reuse the cache) and memory-map them read-only."""
    os.makedirs(cache_dir, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    paths = {}
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        path = cache_path(cache_dir, corpus.name, tokenizer.fingerprint, split)
        if not os.path.exists(path):
            _tokenize_to_file(docs, tokenizer, path, dtype, num_proc, split)
        paths[split] = path
    return TokenStreams(
        train=open_stream(paths["train"], dtype),
        val=open_stream(paths["val"], dtype),
        train_path=paths["train"],
        val_path=paths["val"],
    )


def open_stream(path: str, dtype) -> np.ndarray:
    if os.path.getsize(path) == 0:  # mmap cannot map an empty file
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r")


def _chunk_documents(docs: list[str]) -> tuple[list[str], list[bool]]:
    """Rows to tokenize and, per row, whether it ends a document (EOS goes after those only)."""
    texts, ends = [], []
    for doc in docs:
        start = 0
        while len(doc) - start > CHUNK_CHARS:
            cut = doc.find("\n", start + CHUNK_CHARS) + 1  # just after a newline
            if cut == 0:
                break
            texts.append(doc[start:cut])
            ends.append(False)
            start = cut
        texts.append(doc[start:])
        ends.append(True)
    return texts, ends


class _Encode:
    """`datasets.map` function (a class, so it pickles cleanly into worker processes)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        eos = self.tokenizer.eos_id
        ids = self.tokenizer.encode_batch(batch["text"])
        return {"ids": [x + [eos] if end else x for x, end in zip(ids, batch["eod"])]}


def _tokenize_to_file(docs: list[str], tokenizer: Tokenizer, path: str, dtype, num_proc: int, split: str) -> None:
    import datasets

    texts, ends = _chunk_documents(docs)
    # datasets starts a process pool for any num_proc >= 1 (even 1), so pass None to stay in-process
    # when there is too little to split (it also refuses num_proc > rows).
    procs = num_proc if num_proc > 1 and len(texts) >= 2 * num_proc else None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            if texts:
                table = datasets.Dataset.from_dict({"text": texts, "eod": ends})
                fingerprint = hashlib.sha256(os.path.basename(path).encode()).hexdigest()[:16]
                mapped = table.map(
                    _Encode(tokenizer),
                    batched=True,
                    batch_size=_MAP_BATCH_ROWS,
                    num_proc=procs,
                    keep_in_memory=True,
                    remove_columns=["text", "eod"],
                    features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
                    new_fingerprint=fingerprint,
                    desc=f"tokenizing {split}",
                )
                for chunk in mapped.data.column("ids").chunks:
                    fh.write(np.asarray(chunk.flatten()).astype(dtype).tobytes())
