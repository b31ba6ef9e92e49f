"""Documents one at a time: where a `--data` spec points, and generators that read it lazily.

Both paths into the trainer read documents through here: `load_corpus` (corpus.py), which collects
them into lists for small corpora, and the prepare command (prepare_tokens.py), which streams a
corpus of any size through the tokenizer without ever holding it. Every reader is a generator, so
a caller that stops early (a ``--max_documents`` cap, a tokenizer sample) reads no further:

* a text file (any suffix other than ``.jsonl`` / ``.parquet``): one document, the whole file
  (read whole: a corpus of one huge text file is better stored as jsonl or parquet);
* ``.jsonl``: one document per line, from the field `text_field`;
* ``.parquet``: one document per row, from the column `text_field`, read one row group at a time;
* a folder or glob: those files in sorted path order (`resolve_source`);
* a Hugging Face dataset ``name[:config]``: `iter_hub_documents` loads it with
  ``datasets.load_dataset(..., streaming=True)``, so rows arrive as they download;
  `iter_dataset_texts` reads any ``datasets`` dataset, streaming or not, the same way.

Empty documents are skipped everywhere (they would only add a lone end-of-document token).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bll_ds.infra.errors import UserError

FOLDER_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")
TOKENS_PREFIX = "tokens:"  # --data tokens:DIR, a folder written by the prepare command
# Suffixes that make a spec look like a file even without a slash ("shakespeare.txt").
_PATHLIKE_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".json", ".parquet", ".csv", ".text")


@dataclass
class Source:
    """A resolved --data spec: local `files` (kind "files") or a hub dataset `spec` (kind "hub")."""

    kind: str
    name: str  # "glob:/abs/pattern", "dir:/abs", "file:/abs" or "hub:name[:config]"
    files: list[str]


def resolve_source(spec: str) -> Source:
    """Which files (or which hub dataset) a --data spec names; UserError for paths that do not exist."""
    spec = str(spec)
    if spec.startswith(TOKENS_PREFIX):
        raise UserError(
            f"--data {spec} names an already tokenized folder, which has no documents to read.",
            "pass tokens:DIR to pretrain.py only; to prepare a folder, pass the raw corpus to "
            "python -m bll_ds.data.prepare_tokens --data ...",
        )
    expanded = os.path.expanduser(spec)
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise UserError(f"data glob {spec!r} matches no files.", "check the pattern (quote it so the shell does not expand it).")
        return Source("files", f"glob:{os.path.abspath(expanded)}", files)
    if os.path.isdir(expanded):
        files = folder_files(expanded)
        if not files:
            raise UserError(
                f"data folder {spec} holds no {'/'.join(FOLDER_SUFFIXES)} files.",
                "point --data at a folder with text files, or at a single file.",
            )
        return Source("files", f"dir:{os.path.abspath(expanded)}", files)
    if os.path.isfile(expanded):
        return Source("files", f"file:{os.path.abspath(expanded)}", [expanded])
    if looks_like_path(spec):
        raise UserError(
            f"data path {spec} does not exist.",
            "check the path (relative paths are resolved from the current directory), "
            "or leave --data unset to use the embedded default corpus.",
        )
    return Source("hub", f"hub:{spec}", [])


def looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub dataset name. `owner/name` (one slash, no suffix) may be either,
    so it falls through to the hub, whose error message then also says no such local path exists."""
    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    return spec.lower().endswith(_PATHLIKE_SUFFIXES)


def folder_files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # .git, .cache, ...
        out += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(FOLDER_SUFFIXES)]
    return sorted(out)


def iter_documents(spec: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Every non-empty document of `spec`, in load order (sorted path order for local files). For a
    hub dataset, the rows of `split`, streamed."""
    source = resolve_source(spec)
    if source.kind == "hub":
        yield from iter_hub_documents(spec, text_field, split)
        return
    for path in source.files:
        yield from iter_file_documents(path, text_field)


def iter_file_documents(path: str, text_field: str = "text") -> Iterator[str]:
    low = path.lower()
    if low.endswith(".jsonl"):
        yield from iter_jsonl(path, text_field)
    elif low.endswith(".parquet"):
        yield from iter_parquet(path, text_field)
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}).",
                            "convert it to UTF-8, or pass .jsonl/.parquet data.") from None
        if text:
            yield text


def iter_jsonl(path: str, text_field: str = "text") -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}).", "write one JSON object per line.") from None
            if not isinstance(row, dict) or text_field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(
                    f"{path} line {lineno} has no \"{text_field}\" field (fields present: {fields}).",
                    f'give every line a "{text_field}" field holding the document, or name the field that '
                    "does with --text_field.",
                )
            text = row[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path} line {lineno}: \"{text_field}\" is {type(text).__name__}, not a string.",
                                f'store each document as a string in "{text_field}".')
            if text:
                yield text


def iter_parquet(path: str, text_field: str = "text") -> Iterator[str]:
    """One row group at a time: a parquet file of any size needs the memory of its largest group."""
    import pyarrow.parquet as pq  # datasets depends on pyarrow

    names = pq.read_schema(path).names
    if text_field not in names:
        raise UserError(f"{path} has no \"{text_field}\" column (columns present: {names}).",
                        f'store the documents in a string column named "{text_field}", or name the column '
                        "that holds them with --text_field.")
    reader = pq.ParquetFile(path)
    for group in range(reader.num_row_groups):
        for text in reader.read_row_group(group, columns=[text_field]).column(text_field).to_pylist():
            if text:
                yield text


def iter_hub_documents(spec: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Rows of a hub dataset ``name[:config]``, streamed (nothing is downloaded ahead of reading)."""
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # the hub raises many types (ConnectionError, DatasetNotFoundError, ValueError, ...)
        raise UserError(
            f"--data {spec!r} is neither an existing local path nor a Hugging Face dataset that could be streamed "
            f"(split {split!r}; {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).",
            "pass an existing file/folder path, or a hub dataset name as name or name:config "
            "(e.g. HuggingFaceFW/fineweb-edu:sample-10BT) and an existing --split, on a machine that can "
            "reach the hub or has it cached.",
        ) from None
    yield from iter_dataset_texts(ds, text_field, f"hub dataset {spec!r}")


def iter_dataset_texts(ds: Iterable[dict], text_field: str = "text", name: str = "the dataset") -> Iterator[str]:
    """The non-empty `text_field` values of a ``datasets`` Dataset or IterableDataset, row by row.
    A streaming dataset may not know its columns before the first row, so the field is checked on
    each row (the first missing one raises)."""
    columns = getattr(ds, "column_names", None)
    if columns and text_field not in columns:
        raise UserError(f"{name} has no \"{text_field}\" column (columns: {columns}).",
                        "name the column that holds the documents with --text_field, or pick a dataset with a "
                        f"\"{text_field}\" column.")
    for index, row in enumerate(ds):
        if text_field not in row:
            raise UserError(f"{name} row {index} has no \"{text_field}\" column (columns: {sorted(row)}).",
                            "name the column that holds the documents with --text_field.")
        text = row[text_field]
        if not isinstance(text, str):
            raise UserError(f"{name} row {index}: \"{text_field}\" is {type(text).__name__}, not a string.",
                            "name a string column with --text_field.")
        if text:
            yield text
