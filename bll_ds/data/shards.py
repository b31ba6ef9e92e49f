"""A prepared tokens folder (``--data tokens:DIR``): its manifest, and its shards as one token array.

The prepare command (prepare_tokens.py) writes, once and outside the training job:

    DIR/
        tokens.json             the manifest, written last: a DIR without it is not finished
        train_00000.bin, ...    raw token ids, little-endian uint16 (uint32 for vocabularies
        val_00000.bin, ...      over 65536: packing.token_dtype), each document followed by EOS
        tokenizer.model         the tokenizer (sentencepiece), or hf_tokenizer/ (Hugging Face),
        tokenizer.json          and bll-ds's sidecar of it (tokenizer.py)

A training run opens the shards as memory maps and reads them through `ShardedTokens`, which
looks like the flat 1-D token stream the sampler and the evaluation take (``len`` and slicing)
without concatenating anything: a window that straddles two shards is read from both. So a corpus
of any size costs each rank only the pages its windows touch. At most `MAX_OPEN_SHARDS` shards are
mapped at once per array (least recently used are closed), because every mapping holds a file
descriptor and a FineWeb-sized folder has thousands of shards.

`open_token_dir` checks the folder before a run relies on it: the manifest exists and is this
format, every shard exists with exactly the bytes its token count needs, and the tokenizer's
fingerprint is the manifest's. Anything else is a `UserError` naming the fix.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bll_ds.data.documents import TOKENS_PREFIX
from bll_ds.data.packing import open_stream
from bll_ds.infra.errors import UserError

MANIFEST = "tokens.json"
FORMAT = "bll-ds-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
MAX_OPEN_SHARDS = 64
_PREPARE_FIX = "run python -m bll_ds.data.prepare_tokens --data SOURCE --tokenizer TOK --out DIR (again) to finish it"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def is_token_dir_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(TOKENS_PREFIX)


def token_dir_path(spec: str) -> str:
    """DIR of ``tokens:DIR`` (or DIR itself)."""
    return os.path.expanduser(spec[len(TOKENS_PREFIX):] if is_token_dir_spec(spec) else spec)


class ShardedTokens:
    """Several token files read as one 1-D array: ``len`` and ``[i]`` / ``[a:b]`` (step 1, returns
    a numpy array), which is all MicroBatchSampler and EvalBatches use."""

    def __init__(self, paths: list[str], counts: list[int], dtype):
        if len(paths) != len(counts):
            raise ValueError("one token count per shard path")
        self.paths = [str(p) for p in paths]
        self.counts = [int(c) for c in counts]
        self.dtype = np.dtype(dtype)
        self._starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)]).astype(np.int64)
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.shape = (len(self),)
        self.ndim = 1

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, k: int) -> np.ndarray:
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        if len(self._open) >= MAX_OPEN_SHARDS:
            self._open.popitem(last=False)
        array = open_stream(self.paths[k], self.dtype)
        self._open[k] = array
        return array

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[start:stop][::step] if stop > start else np.zeros(0, dtype=self.dtype)
            return self._read(start, max(start, stop))
        index = int(key)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {key} is out of range for {n} tokens")
        return self._read(index, index + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        k = first
        while start < stop:
            while self.counts[k] == 0:  # an empty shard holds nothing to read
                k += 1
            lo = start - int(self._starts[k])
            hi = min(stop, int(self._starts[k + 1])) - int(self._starts[k])
            pieces.append(self._shard(k)[lo:hi])
            start += hi - lo
            k += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens in {len(self.paths)} shards, dtype={self.dtype})"


@dataclass
class TokenDir:
    """An opened prepared folder: its manifest and its train and val arrays."""

    path: str
    manifest: dict
    train: ShardedTokens
    val: ShardedTokens

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.path, self.manifest["tokenizer"]["file"])

    @property
    def name(self) -> str:
        """A stable name for logs and caches: the folder and the manifest's content digest."""
        return f"tokens:{os.path.abspath(self.path)}#{self.manifest['tokenizer']['fingerprint'][:16]}" \
               f"#{self.manifest['splits']['train']['tokens']}+{self.manifest['splits']['val']['tokens']}tokens"


def read_manifest(folder: str) -> dict:
    """DIR/tokens.json, checked to be this format; UserError if DIR or its manifest is missing."""
    if not os.path.isdir(folder):
        raise UserError(f"prepared tokens folder {folder} does not exist.",
                        f"check the path after tokens:, or {_PREPARE_FIX}.")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f"{folder} has no {MANIFEST}: it is not a prepared tokens folder, or its prepare did not "
                        f"finish (the manifest is written last).", f"{_PREPARE_FIX}.")
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}).", f"{_PREPARE_FIX}.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest (format {manifest.get('format')!r}, "
                        f"version {manifest.get('version')!r}).", f"{_PREPARE_FIX} with this version of bll-ds.")
    return manifest


def open_token_dir(spec: str, verify: bool = True) -> TokenDir:
    """Open ``tokens:DIR`` (or DIR). `verify` also checks every shard's size and the tokenizer's
    fingerprint (cheap: file sizes and one small file); the rank that prepares the run does it."""
    folder = token_dir_path(spec)
    manifest = read_manifest(folder)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    arrays = {}
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        paths = [os.path.join(folder, s["file"]) for s in shards]
        counts = [int(s["tokens"]) for s in shards]
        if verify:
            for path, count in zip(paths, counts):
                _check_shard(path, count, dtype)
        arrays[split] = ShardedTokens(paths, counts, dtype)
    token_dir = TokenDir(folder, manifest, arrays["train"], arrays["val"])
    if verify:
        _check_tokenizer(token_dir)
    return token_dir


def _check_shard(path: str, count: int, dtype: np.dtype) -> None:
    if not os.path.isfile(path):
        raise UserError(f"shard {path}, listed in the manifest, is missing.",
                        f"restore the folder as the prepare wrote it, or {_PREPARE_FIX}.")
    size, want = os.path.getsize(path), count * dtype.itemsize
    if size != want:
        raise UserError(f"shard {path} holds {size} bytes, but the manifest says {count} tokens ({want} bytes): "
                        f"it is {'short' if size < want else 'too long'} (a partial copy?).",
                        f"copy the folder again, or {_PREPARE_FIX}.")


def _check_tokenizer(token_dir: TokenDir) -> None:
    from bll_ds.data.tokenizer import open_tokenizer

    info = token_dir.manifest["tokenizer"]
    path = token_dir.tokenizer_path
    try:
        tok = open_tokenizer(path, info.get("spec"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"the tokenizer of {token_dir.path} ({path}) cannot be opened ({e}).",
                        f"restore the folder as the prepare wrote it, or {_PREPARE_FIX}.") from None
    if tok.fingerprint != info["fingerprint"] or tok.vocab_size != info["vocab_size"]:
        raise UserError(f"the tokenizer at {path} is not the one {token_dir.path}'s shards were written with "
                        f"(fingerprint {tok.fingerprint[:12]} vs {info['fingerprint'][:12]} in the manifest).",
                        f"restore the folder as the prepare wrote it, or {_PREPARE_FIX}.")


def check_tokenizer_flag(spec: str | None, token_dir: TokenDir) -> None:
    """With tokens:DIR the tokenizer is DIR's: a trained-kind --tokenizer (char, bpe:N, unigram:N,
    the default included) is ignored, but a tokenizer file or folder named there must be DIR's own."""
    if not spec:
        return
    from bll_ds.data.tokenizer import parse_tokenizer_spec

    kind, _ = parse_tokenizer_spec(spec)
    if kind not in ("file", "hf"):
        return
    if kind == "file":
        import hashlib

        found = hashlib.sha256(Path(os.path.expanduser(spec)).read_bytes()).hexdigest()
    else:
        from bll_ds.data.hf_tokenizer import load_hf_source

        found = load_hf_source(spec).fingerprint
    info = token_dir.manifest["tokenizer"]
    if found != info["fingerprint"]:
        raise UserError(f"--tokenizer {spec} is not the tokenizer {token_dir.path} was prepared with "
                        f"({info['spec']}); a prepared folder's ids only mean something with its own tokenizer.",
                        "drop --tokenizer (the run uses the folder's), or prepare the data again with this tokenizer.")
