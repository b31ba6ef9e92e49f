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
* a ``.jsonl`` file: one document per line, from the field ``"text"``.
* a ``.parquet`` file: one document per row, from the column ``"text"``.
* a folder: every ``.txt``, ``.md``, ``.py``, ``.jsonl`` and ``.parquet`` file below it, in sorted
  path order; or a glob pattern (``data/*.txt``, ``corpus/**/*.jsonl``), every file it matches.
* a Hugging Face dataset name, optionally with a config: ``wikitext:wikitext-2-raw-v1`` (loaded
  with ``datasets.load_dataset``; its ``train`` split, and its ``validation`` or else ``test``
  split as val).

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

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from bll_ds.errors import UserError

DEFAULT_CORPUS_MAX_BYTES = 8_000_000
VAL_FRACTION = 0.1
VAL_EVERY = 10
FOLDER_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
_DEFAULT_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})
# Suffixes that make a spec look like a file even without a slash ("shakespeare.txt").
_PATHLIKE_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".json", ".parquet", ".csv", ".text")


@dataclass
class Corpus:
    """Documents of one data source, already split. `name` is a stable cache key (see module doc)."""

    name: str
    train: list[str]
    val: list[str]
    split_rule: str = field(default="")  # how val was made, for logs


def load_corpus(spec: str | None, default_max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> Corpus:
    """Load and split the corpus named by `spec` (see the module docstring for the forms)."""
    if spec is None or spec == "":
        return _default_corpus(default_max_bytes)
    spec = str(spec)
    expanded = os.path.expanduser(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"data glob {spec!r} matches no files.", "check the pattern (quote it so the shell does not expand it).")
        return _local_corpus(f"glob:{os.path.abspath(expanded)}", files)
    if os.path.isdir(expanded):
        files = _folder_files(expanded)
        if not files:
            raise UserError(
                f"data folder {spec} holds no {'/'.join(FOLDER_SUFFIXES)} files.",
                "point --data at a folder with text files, or at a single file.",
            )
        return _local_corpus(f"dir:{os.path.abspath(expanded)}", files)
    if os.path.isfile(expanded):
        return _local_corpus(f"file:{os.path.abspath(expanded)}", [expanded])
    if _looks_like_path(spec):
        raise UserError(
            f"data path {spec} does not exist.",
            "check the path (relative paths are resolved from the current directory), "
            "or leave --data unset to use the embedded default corpus.",
        )
    return _hub_corpus(spec)


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


def _looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub dataset name. `owner/name` (one slash, no suffix) may be either,
    so it falls through to the hub, whose error message then also says no such local path exists."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    return spec.lower().endswith(_PATHLIKE_SUFFIXES)


def _folder_files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .cache, ...
        out += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(FOLDER_SUFFIXES)]
    return sorted(out)


def _files_digest(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _local_corpus(source: str, files: list[str]) -> Corpus:
    docs: list[str] = []
    for f in files:
        docs += _read_documents(f)
    if not any(docs):
        raise UserError(f"data source {source.split(':', 1)[1]} contains no text.", "point --data at files with text in them.")
    train, val, rule = split_documents(docs)
    return Corpus(name=f"{source}#{len(files)}files#{_files_digest(files)}", train=train, val=val, split_rule=rule)


def _read_documents(path: str) -> list[str]:
    low = path.lower()
    if low.endswith(".jsonl"):
        return _read_jsonl(path)
    if low.endswith(".parquet"):
        return _read_parquet(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}).", "convert it to UTF-8, or pass .jsonl/.parquet data.") from None
    return [text] if text else []


def _read_jsonl(path: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}).", "write one JSON object per line.") from None
            if not isinstance(row, dict) or "text" not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(
                    f"{path} line {lineno} has no \"text\" field (fields present: {fields}).",
                    'give every line a "text" field holding the document.',
                )
            if not isinstance(row["text"], str):
                raise UserError(f"{path} line {lineno}: \"text\" is {type(row['text']).__name__}, not a string.", 'store each document as a string in "text".')
            if row["text"]:
                docs.append(row["text"])
    return docs


def _read_parquet(path: str) -> list[str]:
    import pyarrow.parquet as pq  # datasets depends on pyarrow

    names = pq.read_schema(path).names
    if "text" not in names:
        raise UserError(f"{path} has no \"text\" column (columns present: {names}).", 'store the documents in a string column named "text".')
    column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in column if t]


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


def _hub_corpus(spec: str) -> Corpus:
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
    if "text" not in columns:
        raise UserError(f"hub dataset {spec!r} has no \"text\" column (columns: {columns}).", "pick a dataset with a text column, or export it to .jsonl with a text field.")
    train_docs = [t for t in ds["train"]["text"] if t]
    fingerprints = [ds["train"]._fingerprint]
    held = next((s for s in ("validation", "test") if s in ds), None)
    if held is not None:
        val_docs = [t for t in ds[held]["text"] if t]
        fingerprints.append(ds[held]._fingerprint)
        train, val, rule = train_docs, val_docs, f"hub split {held!r}"
    else:
        train, val, rule = split_documents(train_docs)
    return Corpus(name=f"hub:{spec}#{'-'.join(fingerprints)}", train=train, val=val, split_rule=rule)
