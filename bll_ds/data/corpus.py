"""Raw text corpora: where the documents come from and how the held-out split is made.

`load_corpus(spec)` turns one user-facing string into a `Corpus` (train and val lists of
documents). Accepted specs:

* ``None``: the embedded default corpus, the Python standard library sources (``*.py``) of the
  running interpreter. It is always present, needs no download, and is real structured text (code
  with indentation), so the project runs end to end on a machine with no data and no network.
  Test folders (any path component ``test``, ``tests`` or ``idle_test``) and installed packages
  (``site-packages``, ``dist-packages``) are excluded; files are taken in sorted path order until
  `DEFAULT_CORPUS_MAX_BYTES` (8 MB) is reached, which keeps tokenizer training and tokenization to a
  few seconds on a laptop CPU. Files that are not UTF-8 are skipped.
* a text file (any suffix other than ``.jsonl`` / ``.parquet``): one document.
* a ``.jsonl`` file: one document per line, from the field ``"text"`` (``text_field``, the
  ``--text_field`` flag, names another).
* a ``.parquet`` file: one document per row, from the column ``"text"`` (or ``text_field``).
* a folder: every ``.txt``, ``.md``, ``.py``, ``.jsonl`` and ``.parquet`` file below it, in sorted
  path order; or a glob pattern (``data/*.txt``, ``corpus/**/*.jsonl``), every file it matches.
* a Hugging Face dataset name, optionally with a config: ``wikitext:wikitext-2-raw-v1`` (loaded
  with ``datasets.load_dataset``; its ``train`` split, and its ``validation`` or else ``test``
  split as val), its column ``"text"`` (or ``text_field``).

The files are read by the generators in documents.py, which the prepare command (prepare_tokens.py)
streams instead: this module holds the whole corpus in memory, which suits corpora up to a few GB;
larger ones are prepared once into token shards and trained with ``--data tokens:DIR``.

Held-out split (sources without their own validation split):

* fewer than `VAL_EVERY` (10) documents, e.g. a single text file: the last `VAL_FRACTION` (10%) of
  the characters of each document is val. For one file this is exactly nanoGPT's Tiny Shakespeare
  split (``data[:int(n * 0.9)]`` / ``data[int(n * 0.9):]``), so val losses are comparable with
  nanoGPT's published numbers. (With 2..9 documents, taking whole documents would leave val
  empty, so the per-document character split is used there too.)
* otherwise: every 10th document (index % 10 == 9, in load order, which is sorted path order) is
  val. Whole documents keep val free of text that shares a document with training text.

Empty documents are dropped everywhere (they would only add a lone end-of-document token).

`Corpus.name` is the cache key for everything derived from the text (tokenizer training data,
token caches): it names the source and a digest of each file's path, size and mtime (or of the hub
dataset's fingerprint), so editing a file invalidates the caches without reading the text twice.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from bll_ds.data.documents import FOLDER_SUFFIXES, iter_file_documents, resolve_source  # noqa: F401
from bll_ds.infra.errors import UserError

DEFAULT_CORPUS_MAX_BYTES = 8_000_000
VAL_FRACTION = 0.1
VAL_EVERY = 10
_DEFAULT_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


@dataclass
class Corpus:
    """Documents of one data source, already split. `name` is a stable cache key (see module doc)."""

    name: str
    train: list[str]
    val: list[str]
    split_rule: str = field(default="")  # how val was made, for logs


def load_corpus(spec: str | None, default_max_bytes: int = DEFAULT_CORPUS_MAX_BYTES, text_field: str = "text") -> Corpus:
    """Load and split the corpus named by `spec` (see the module docstring for the forms).
    `text_field` names the jsonl field, parquet column or hub dataset column holding the text."""
    if spec is None or spec == "":
        return _default_corpus(default_max_bytes)
    source = resolve_source(str(spec))
    if source.kind == "hub":
        return _hub_corpus(str(spec), text_field)
    return _local_corpus(source.name, source.files, text_field)


def split_documents(docs: list[str]) -> tuple[list[str], list[str], str]:
    """Split documents into (train, val, rule) by the rules in the module docstring."""
    if len(docs) < VAL_EVERY:
        train, val = [], []
        for doc in docs:
            cut = int(len(doc) * (1 - VAL_FRACTION))
            train.append(doc[:cut])
            val.append(doc[cut:])
        return [d for d in train if d], [d for d in val if d], f"last {VAL_FRACTION:.0%} of characters of each document"
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val, f"every {VAL_EVERY}th document"


def _files_digest(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _local_corpus(source: str, files: list[str], text_field: str = "text") -> Corpus:
    docs: list[str] = []
    for f in files:
        docs += iter_file_documents(f, text_field)
    if not any(docs):
        raise UserError(f"data source {source.split(':', 1)[1]} contains no text.", "point --data at files with text in them.")
    train, val, rule = split_documents(docs)
    name = f"{source}#{len(files)}files#{_files_digest(files)}{_field_key(text_field)}"
    return Corpus(name=name, train=train, val=val, split_rule=rule)


def _field_key(text_field: str) -> str:
    """Part of `Corpus.name`: another field of the same files is other text (and another token
    cache). Empty for the default field, so existing cache keys are unchanged."""
    return "" if text_field == "text" else f"#field={text_field}"


def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> tuple[list[str], list[str]]:
    """(paths, texts) of the embedded default corpus: stdlib ``*.py`` files, sorted by path relative
    to the stdlib root, minus test folders and installed packages, until `max_bytes` of UTF-8."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _DEFAULT_EXCLUDED_DIRS and d != "__pycache__"]
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    used, docs, total = [], [], 0
    for p in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        try:
            text = Path(p).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        if text:
            used.append(p)
            docs.append(text)
            total += size
    return used, docs


def _default_corpus(max_bytes: int) -> Corpus:
    root = sysconfig.get_paths()["stdlib"]
    used, docs = default_corpus_files(max_bytes)
    total = sum(len(d.encode("utf-8")) for d in docs)
    if len(docs) < VAL_EVERY:
        raise UserError(
            f"the embedded default corpus (Python standard library at {root}) yielded only {len(docs)} files.",
            "pass --data with a text file, folder or dataset name.",
        )
    train, val, rule = split_documents(docs)
    version = ".".join(map(str, sys.version_info[:3]))
    name = f"default:python{version}-stdlib:{root}#{len(used)}files#{total}bytes#{_files_digest(used)}"
    return Corpus(name=name, train=train, val=val, split_rule=rule)


def _hub_corpus(spec: str, text_field: str = "text") -> Corpus:
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # the hub raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
        raise UserError(
            f"--data {spec!r} is neither an existing local path nor a Hugging Face dataset that could be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).",
            "pass an existing file/folder path, or a hub dataset name as name or name:config "
            "(e.g. wikitext:wikitext-2-raw-v1) on a machine that can reach the hub or has it cached.",
        ) from None
    if "train" not in ds:
        raise UserError(f"hub dataset {spec!r} has no train split (splits: {sorted(ds)}).", "pick a dataset with a train split.")
    columns = ds["train"].column_names
    if text_field not in columns:
        raise UserError(f"hub dataset {spec!r} has no \"{text_field}\" column (columns: {columns}).",
                        "name the column that holds the documents with --text_field, or pick a dataset with a "
                        f"\"{text_field}\" column.")
    train_docs = [t for t in ds["train"][text_field] if t]
    fingerprints = [ds["train"]._fingerprint]
    held = next((s for s in ("validation", "test") if s in ds), None)
    if held is not None:
        val_docs = [t for t in ds[held][text_field] if t]
        fingerprints.append(ds[held]._fingerprint)
        train, val, rule = train_docs, val_docs, f"hub split {held!r}"
    else:
        train, val, rule = split_documents(train_docs)
    return Corpus(name=f"hub:{spec}#{'-'.join(fingerprints)}{_field_key(text_field)}", train=train, val=val,
                  split_rule=rule)
