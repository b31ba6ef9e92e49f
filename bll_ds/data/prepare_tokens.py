"""The prepare command: tokenize a corpus of any size once, outside the training job, into shards.

    python -m bll_ds.data.prepare_tokens --data SPEC --tokenizer TOK --out DIR \\
        [--text_field text] [--split train] [--shard_tokens 100000000] [--val_every 10] \\
        [--max_documents N] [--tokenize_workers K] [--tokenizer_sample_chars 20000000]
    # (scripts/prepare_data.py is the same command), then:
    deepspeed ... scripts/pretrain.py --data tokens:DIR ...

Why a separate command: a training run's data step (bll_ds/data/prepare.py) reads the whole corpus
into memory on rank 0 while every other rank waits, which is fine for Tiny Shakespeare and
impossible for FineWeb. Here documents are *streamed* (documents.py: text files one document each,
jsonl line by line, parquet row group by row group, a Hugging Face dataset with
``streaming=True``), tokenized in batches (in `--tokenize_workers` processes, with at most two
batches per worker in flight, so memory stays bounded whatever the corpus size), and appended to
shard files.
The corpus is never a list in memory.

Conventions are packing.py's, so a folder holds exactly the token stream the in-memory path makes
for the same documents and tokenizer: each document's ids followed by the tokenizer's EOS;
documents over ``packing.CHUNK_CHARS`` characters tokenized in newline-cut chunks (EOS after the
last only); ids as ``packing.token_dtype(vocab)`` (uint16 up to 65536 pieces, else uint32), written
little-endian.

Held-out split: whole documents, every `--val_every`-th non-empty document (index % val_every ==
val_every - 1, counted in stream order) is val: corpus.py's rule for multi-document corpora, so
``--val_every 10`` on a folder or jsonl gives the in-memory path's split. (corpus.py's
character split for fewer than 10 documents does not apply: a corpus worth preparing has many
documents, and fewer than `val_every` of them is an error here.) A hub dataset is read from one
``--split`` and held out by the same rule; its own validation split is not used.

Shards: ``DIR/train_00000.bin``, ... and ``DIR/val_00000.bin``, ..., each exactly `--shard_tokens`
tokens except the last of each split (the cut ignores document boundaries: training reads the
shards as one stream, shards.py). Default 10^8 tokens (200 MB at uint16, nanoGPT's FineWeb shard).

Tokenizer (`--tokenizer`, tokenizer.py's specs): an existing sentencepiece ``.model``, a Hugging
Face ``tokenizer.json`` or folder (copied, nothing trained), or ``char`` / ``bpe:N`` /
``unigram:N`` trained by tokenizer.py's trainer on a sample: the first
`--tokenizer_sample_chars` characters (default 2 * 10^7, tokenizer.py's MAX_TRAIN_CHARS) of the
training documents, in stream order (whole documents, the last one cut). Sampling reads the start
of the stream a first time; tokenizing reads it all. ``char`` gives characters absent from the
sample no id (they become <unk>), so prefer bpe/unigram (byte fallback) for big corpora. The
tokenizer is saved in DIR as a run dir saves it (``tokenizer.model`` or ``hf_tokenizer/``, plus
the sidecar), and a training run copies it into its run dir.

Atomic: each shard is written to a temporary name and renamed when full; the manifest
``DIR/tokens.json`` is written last (also via rename), so a killed prepare leaves a DIR without a
manifest, which training refuses (shards.py) and a new prepare into the same DIR starts over (it
removes the shards, temporaries and tokenizer it finds there, and nothing else). A DIR that
already has a manifest is never overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from bll_ds.data.documents import iter_documents, resolve_source
from bll_ds.data.packing import CHUNK_CHARS, _chunk_documents, token_dtype
from bll_ds.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, SPLITS, shard_name
from bll_ds.data.tokenizer import MAX_TRAIN_CHARS, build_tokenizer, parse_tokenizer_spec
from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.infra.errors import UserError
from bll_ds.run.run_dir import HF_TOKENIZER, TOKENIZER_META, TOKENIZER_MODEL

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_EVERY = 10
BATCH_CHARS = 2_000_000  # characters per tokenization batch (one task of a worker)
BATCH_ROWS = 1024
PROGRESS_SECONDS = 30.0
_OWNED = re.compile(r"^((train|val)_\d{5}\.bin|tokens\.json)(\.tmp\.\d+)?$")


def prepare_tokens(data: str, tokenizer: str, out: str, text_field: str = "text", split: str = "train",
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, val_every: int = DEFAULT_VAL_EVERY,
                   max_documents: int | None = None, workers: int = 1, sample_chars: int = MAX_TRAIN_CHARS,
                   documents: Callable[[], Iterable[str]] | None = None,
                   log: Callable[[str], None] | None = print) -> dict:
    """Write the prepared folder `out` (module docstring); returns its manifest. `documents`
    replaces the reader of `data` by any callable returning a fresh iterable of documents (a
    ``datasets`` IterableDataset wrapped by documents.iter_dataset_texts, a generator): it is
    called once for a tokenizer sample (when one is trained) and once to tokenize."""
    _check_options(shard_tokens, val_every, max_documents, workers, sample_chars)
    kind, _ = parse_tokenizer_spec(tokenizer)
    if documents is None:
        source_name = resolve_source(data).name  # a missing path fails here, before any work

        def documents():
            return iter_documents(data, text_field, split)
    else:
        source_name = str(data)
    out = os.path.expanduser(str(out))
    _start_folder(out)
    say = log or (lambda message: None)
    started = time.monotonic()

    sample_docs, sample = [], None
    if kind in ("char", "bpe", "unigram"):
        sample_docs = _sample(_numbered(documents(), max_documents), val_every, sample_chars)
        sample = {"chars": sum(len(d) for d in sample_docs), "documents": len(sample_docs), "max_chars": sample_chars}
        say(f"bll-ds prepare: training tokenizer {tokenizer} on {sample['chars']:,} characters "
            f"({sample['documents']} documents)")
    tok = build_tokenizer(tokenizer, sample_docs, out)
    del sample_docs
    dtype = np.dtype(token_dtype(tok.vocab_size)).newbyteorder("<")

    writers = {s: ShardWriter(out, s, shard_tokens, dtype) for s in SPLITS}
    counts = {"documents": 0, "train": 0, "val": 0}
    try:
        batches = _batches(_numbered(documents(), max_documents), val_every, counts)
        last_report = time.monotonic()
        for train_ids, val_ids in encode_batches(batches, tok, workers):
            writers["train"].write(train_ids)
            writers["val"].write(val_ids)
            if time.monotonic() - last_report > PROGRESS_SECONDS:
                last_report = time.monotonic()
                done = writers["train"].tokens + writers["val"].tokens
                say(f"bll-ds prepare: {counts['documents']:,} documents, {done:,} tokens "
                    f"({done / (last_report - started):,.0f} tokens/s)")
        _check_counts(counts, val_every, writers)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise

    manifest = _manifest(data, source_name, text_field, split, tokenizer, kind, tok, out, dtype, shard_tokens,
                         val_every, max_documents, counts, writers, sample, time.monotonic() - started)
    atomic_write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    say(f"bll-ds prepare: wrote {out}: {manifest['splits']['train']['tokens']:,} train and "
        f"{manifest['splits']['val']['tokens']:,} val tokens in "
        f"{len(writers['train'].shards) + len(writers['val'].shards)} shards from {counts['documents']:,} documents "
        f"({manifest['seconds']:.1f} s); train with --data tokens:{out}")
    return manifest


class ShardWriter:
    """Appends token ids of one split to ``{split}_NNNNN.bin`` shards of `shard_tokens` tokens each,
    every shard written under a temporary name and renamed into place once complete."""

    def __init__(self, folder: str, split: str, shard_tokens: int, dtype: np.dtype):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.shards: list[dict] = []
        self.tokens = 0
        self._fh = None
        self._tmp = None
        self._filled = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            if self._fh is None:
                self._tmp = os.path.join(self.folder, f"{shard_name(self.split, len(self.shards))}.tmp.{os.getpid()}")
                self._fh = open(self._tmp, "wb")
                self._filled = 0
            take = min(len(ids), self.shard_tokens - self._filled)
            self._fh.write(ids[:take].tobytes())
            self._filled += take
            self.tokens += take
            ids = ids[take:]
            if self._filled == self.shard_tokens:
                self._finish()

    def close(self) -> None:
        if self._fh is not None:
            self._finish()

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp and os.path.exists(self._tmp):
            os.remove(self._tmp)

    def _finish(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        name = shard_name(self.split, len(self.shards))
        os.replace(self._tmp, os.path.join(self.folder, name))
        self.shards.append({"file": name, "tokens": self._filled})


def encode_batches(batches: Iterable[tuple], tokenizer, workers: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train ids, val ids) of each batch, in order; `workers` > 1 encodes in a process pool with
    at most 2 * workers batches in flight (Pool.imap would read the whole input ahead)."""
    if workers <= 1:
        for batch in batches:
            yield _encode(tokenizer, batch)
        return
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(batch):
    return _encode(_WORKER_TOKENIZER, batch)


def _encode(tokenizer, batch) -> tuple[np.ndarray, np.ndarray]:
    """Batch = (texts, ends, held_out): EOS after the rows that end a document (packing.py's rule)."""
    texts, ends, held_out = batch
    eos = tokenizer.eos_id
    ids = tokenizer.encode_batch(texts)
    parts = {False: [], True: []}
    for row, end, val in zip(ids, ends, held_out):
        parts[val].append(row)
        if end:
            parts[val].append((eos,))
    return tuple(np.fromiter(itertools.chain.from_iterable(parts[val]), dtype=np.int64) for val in (False, True))


def _numbered(docs: Iterable[str], max_documents: int | None) -> Iterator[tuple[int, str]]:
    """(index, document) of the non-empty documents, at most `max_documents` of them."""
    numbered = enumerate(d for d in docs if d)
    return itertools.islice(numbered, max_documents) if max_documents else numbered


def _is_val(index: int, val_every: int) -> bool:
    return index % val_every == val_every - 1


def _sample(numbered: Iterable[tuple[int, str]], val_every: int, max_chars: int) -> list[str]:
    """The first `max_chars` characters of the training documents (held-out ones never train the
    tokenizer, as in the in-memory path)."""
    out, total = [], 0
    for index, doc in numbered:
        if _is_val(index, val_every):
            continue
        out.append(doc[: max_chars - total])
        total += len(out[-1])
        if total >= max_chars:
            break
    return out


def _batches(numbered: Iterable[tuple[int, str]], val_every: int, counts: dict) -> Iterator[tuple]:
    """Rows (packing's chunks of each document) grouped into batches of about BATCH_CHARS."""
    texts, ends, held, chars = [], [], [], 0
    for index, doc in numbered:
        val = _is_val(index, val_every)
        counts["documents"] += 1
        counts["val" if val else "train"] += 1
        rows, row_ends = _chunk_documents([doc]) if len(doc) > CHUNK_CHARS else ([doc], [True])
        for text, end in zip(rows, row_ends):
            texts.append(text)
            ends.append(end)
            held.append(val)
            chars += len(text)
            if chars >= BATCH_CHARS or len(texts) >= BATCH_ROWS:
                yield texts, ends, held
                texts, ends, held, chars = [], [], [], 0
    if texts:
        yield texts, ends, held


def _check_options(shard_tokens, val_every, max_documents, workers, sample_chars) -> None:
    if shard_tokens < 1:
        raise UserError(f"--shard_tokens {shard_tokens} is not positive.", "pass the tokens per shard, e.g. 100000000.")
    if val_every < 2:
        raise UserError(f"--val_every {val_every} would leave no training documents (or no held-out ones).",
                        "pass 2 or more: every val_every-th document is held out (10 = 10%).")
    if max_documents is not None and max_documents < 1:
        raise UserError(f"--max_documents {max_documents} is not positive.", "omit it to read every document.")
    if workers < 1:
        raise UserError(f"--tokenize_workers {workers} is not positive.", "pass 1 (this process) or more.")
    if sample_chars < 1:
        raise UserError(f"--tokenizer_sample_chars {sample_chars} is not positive.",
                        f"pass the characters to train the tokenizer on, e.g. {MAX_TRAIN_CHARS}.")


def _check_counts(counts: dict, val_every: int, writers: dict) -> None:
    if counts["val"] == 0 or writers["train"].tokens == 0:
        raise UserError(f"the source has {counts['documents']} non-empty documents, so holding out every "
                        f"{val_every}th leaves {'no validation' if counts['val'] == 0 else 'no training'} documents.",
                        "use more documents, or a smaller --val_every (for a single text file, train on it "
                        "directly with pretrain.py --data FILE: it splits characters).")


def _start_folder(out: str) -> None:
    """Refuse a finished folder; clear what a killed prepare left (ours only), keep anything else."""
    if os.path.isfile(os.path.join(out, MANIFEST)):
        raise UserError(f"{out} already holds prepared tokens ({MANIFEST}).",
                        "choose a new --out, or delete that folder to prepare it again.")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file.", "pass a folder path (it is created).")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if _OWNED.match(name):
            os.remove(os.path.join(out, name))
    if _is_our_sidecar(os.path.join(out, TOKENIZER_META)):  # a tokenizer.json of another kind is left alone
        for name in (TOKENIZER_META, TOKENIZER_MODEL):
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, HF_TOKENIZER), ignore_errors=True)


def _is_our_sidecar(path: str) -> bool:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "spec" in meta and "sha256" in meta


def _manifest(data, source_name, text_field, split, spec, kind, tok, out, dtype, shard_tokens, val_every,
              max_documents, counts, writers, sample, seconds) -> dict:
    is_hf = os.path.isdir(tok.path)
    tokenizer_file = HF_TOKENIZER if is_hf else TOKENIZER_MODEL
    file_bytes = Path(out, HF_TOKENIZER, "tokenizer.json").read_bytes() if is_hf else Path(out, TOKENIZER_MODEL).read_bytes()
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": data,
        "source_name": source_name,
        "text_field": text_field,
        "split": split if source_name.startswith("hub:") else None,
        "max_documents": max_documents,
        "held_out": {"val_every": val_every,
                     "rule": f"whole documents: every {val_every}th non-empty document in stream order "
                             f"(index % {val_every} == {val_every - 1}) is val"},
        "documents": dict(counts),
        "tokenizer": {"spec": spec, "kind": "huggingface" if is_hf else "sentencepiece", "file": tokenizer_file,
                      "fingerprint": tok.fingerprint, "sha256": hashlib.sha256(file_bytes).hexdigest(),
                      "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "trained": kind in ("char", "bpe", "unigram"),
                      "sample": sample},
        "dtype": dtype.name,
        "byte_order": "little",
        "eod": "each document's ids are followed by the tokenizer's eos_id",
        "shard_tokens": shard_tokens,
        "splits": {s: {"tokens": writers[s].tokens, "shards": writers[s].shards} for s in SPLITS},
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class _FormerName(argparse.Action):
    """A renamed flag's old spelling: stores into the new flag's dest, and says so."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"bll-ds: {option_string} is now --{self.dest} (pretrain.py's name for the same knob)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bll_ds.data.prepare_tokens",
                                formatter_class=DefaultsHelpFormatter,
                                description="Tokenize a corpus once into sharded token files for "
                                            "pretrain.py --data tokens:DIR (streamed: any corpus size).")
    p.add_argument("--data", required=True, help="text/jsonl/parquet file, folder, glob, or HF dataset name[:config] "
                                                 "(streamed)")
    p.add_argument("--tokenizer", required=True, help="'char', 'bpe:N', 'unigram:N' (trained on a sample), a "
                                                      "sentencepiece .model, or a Hugging Face tokenizer.json / folder")
    p.add_argument("--out", required=True, help="folder to write (shards, tokens.json, the tokenizer)")
    p.add_argument("--text_field", default="text", help="jsonl field / parquet column / HF feature holding the text")
    p.add_argument("--split", default="train", help="split of a Hugging Face dataset to read")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--val_every", type=int, default=DEFAULT_VAL_EVERY,
                   help="hold out every val_every-th document (index %% val_every == val_every - 1)")
    p.add_argument("--max_documents", type=int, default=None, help="stop after this many documents (default: all)")
    p.add_argument("--tokenize_workers", type=int, default=1,
                   help="tokenizer processes (pretrain.py's flag of the same name sets them for in-memory data)")
    # The flag's former name, kept so recorded commands still run; it says it was renamed.
    p.add_argument("--workers", type=int, dest="tokenize_workers", action=_FormerName, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--tokenizer_sample_chars", type=int, default=MAX_TRAIN_CHARS,
                   help="characters of training documents a char/bpe/unigram tokenizer is trained on")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prepare_tokens(args.data, args.tokenizer, args.out, text_field=args.text_field, split=args.split,
                       shard_tokens=args.shard_tokens, val_every=args.val_every, max_documents=args.max_documents,
                       workers=args.tokenize_workers, sample_chars=args.tokenizer_sample_chars)
    except UserError as err:
        print(f"bll-ds: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
