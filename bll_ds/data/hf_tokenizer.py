"""Hugging Face tokenizers behind the interface of tokenizer.py's `Tokenizer`, loaded offline.

``--tokenizer PATH`` where PATH is a ``tokenizer.json`` file (the `tokenizers` library's format) or
a local tokenizer folder (``tokenizer.json``, or ``tokenizer.model`` + ``tokenizer_config.json``,
as ``save_pretrained`` writes it): nothing is trained and nothing is downloaded
(``AutoTokenizer.from_pretrained(folder, local_files_only=True)``). The trainer only sees
`HFTokenizer`, which offers what `Tokenizer` offers (vocab_size, eos_id, encode, encode_batch,
decode, fingerprint, path, spec, pickling by value), so packing, the sampler and the prepare
command need no second code path.

What the ids are: those of the tokenizer's `tokenizers` backend (its ``tokenizer.json``) with
``add_special_tokens=False``. Pretraining packs documents itself (each followed by the
end-of-document token), so a BOS or template that the tokenizer's post-processor would add is
left out, as it is for the sentencepiece tokenizers. A folder is loaded once through
``transformers`` (which converts a slow, ``tokenizer.model``-only tokenizer to a fast one) and then
kept as its backend's JSON.

The vocabulary size is ``len(tokenizer)``, added tokens included (and never less than the largest
id + 1, so the embedding holds every id). The end-of-document token is the tokenizer's EOS: the
``eos_token`` of the folder's (or the ``tokenizer.json``'s sibling) ``tokenizer_config.json``;
for a bare ``tokenizer.json``, a special token with a well-known EOS name (`EOS_NAMES`). No EOS is
an error naming the fix, because packing needs one.

Saved form (a run dir, or a prepared tokens folder): the folder `HF_TOKENIZER` holding
``tokenizer.json`` (the backend) and a minimal ``tokenizer_config.json`` (the EOS and the other
named specials), loadable by ``AutoTokenizer.from_pretrained`` offline (`transformers_tokenizer`).
The fingerprint is the sha256 of those ``tokenizer.json`` bytes and the EOS token, so a
different vocabulary or a different end-of-document token never shares a token cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bll_ds.infra.atomic import atomic_write_text
from bll_ds.infra.errors import UserError
from bll_ds.run.run_dir import HF_TOKENIZER

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]", "<|im_end|>")
HF_FOLDER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_SPECIALS = ("eos_token", "bos_token", "unk_token", "pad_token")


def is_hf_tokenizer_path(spec: str) -> bool:
    """A ``*.json`` file, or a folder holding one of `HF_FOLDER_FILES`."""
    path = os.path.expanduser(str(spec))
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, f)) for f in HF_FOLDER_FILES)
    return path.endswith(".json")


class HFTokenizer:
    """A `tokenizers` backend plus its end-of-document token; see the module docstring."""

    def __init__(self, backend_json: str, eos_token: str, path: str, spec: str | None = None,
                 specials: dict | None = None):
        from tokenizers import Tokenizer as Backend

        self.path = str(path)
        self.spec = spec if spec is not None else self.path
        self.eos_token = eos_token
        self.specials = {k: v for k, v in (specials or {}).items() if v is not None}
        self.specials["eos_token"] = eos_token
        self._json = backend_json
        self._tk = Backend.from_str(backend_json)
        self.fingerprint = fingerprint(backend_json, eos_token)
        eos_id = self._tk.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(f"tokenizer {self.spec}: its end-of-document token {eos_token!r} is not in its vocabulary.",
                            "set eos_token in tokenizer_config.json to a token the tokenizer has.")
        self._eos_id = eos_id
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._tk.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)

    @classmethod
    def load(cls, folder: str, spec: str | None = None) -> "HFTokenizer":
        """A tokenizer saved by `save` (a run dir's or a prepared folder's `HF_TOKENIZER`)."""
        folder = Path(folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        return cls((folder / "tokenizer.json").read_text(encoding="utf-8"), config["eos_token"], str(folder), spec,
                   {k: config.get(k) for k in _SPECIALS})

    def save(self, out_dir: str) -> str:
        """Write `HF_TOKENIZER` under `out_dir` (each file atomically); returns the folder."""
        folder = Path(out_dir) / HF_TOKENIZER
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self._json)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.specials, "bll_ds_source": self.spec}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return str(folder)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        return self._special_id("bos_token")

    @property
    def unk_id(self) -> int:
        return self._special_id("unk_token")

    def _special_id(self, name: str) -> int:
        """-1 when absent, as sentencepiece reports a disabled special."""
        token = self.specials.get(name)
        found = self._tk.token_to_id(token) if token else None
        return -1 if found is None else found

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts in one call (the `tokenizers` library parallelises it itself)."""
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_token(int(i))

    def __getstate__(self):
        return {"json": self._json, "eos": self.eos_token, "path": self.path, "spec": self.spec, "specials": self.specials}

    def __setstate__(self, state):
        self.__init__(state["json"], state["eos"], state["path"], state["spec"], state["specials"])

    def __repr__(self) -> str:
        return f"HFTokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}, path={self.path!r})"


def fingerprint(backend_json: str, eos_token: str) -> str:
    return hashlib.sha256(backend_json.encode("utf-8") + b"\0eos:" + eos_token.encode("utf-8")).hexdigest()


def load_hf_source(spec: str) -> HFTokenizer:
    """The tokenizer that ``--tokenizer PATH`` names (a tokenizer.json file or a folder), in memory."""
    path = os.path.expanduser(str(spec).strip())
    if not os.path.exists(path):
        raise UserError(f"tokenizer {spec} does not exist.",
                        "pass an existing tokenizer.json file or tokenizer folder (or bpe:N / char / a .model file).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")) \
            and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")  # a bare tokenizer.json in a folder of its own
    if os.path.isfile(path):
        return _from_json_file(path, spec)
    return _from_folder(path, spec)


def _from_json_file(path: str, spec: str) -> HFTokenizer:
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_file(path)
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise UserError(f"{spec} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__}).",
                        "pass a tokenizer.json written by the tokenizers library or save_pretrained, "
                        "or a tokenizer folder.") from None
    sibling = Path(path).with_name("tokenizer_config.json")
    specials = _config_specials(json.loads(sibling.read_text())) if sibling.is_file() else {}
    eos = specials.get("eos_token")
    if not eos:
        added = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        eos = next((name for name in EOS_NAMES if name in added), None)
    if not eos:
        raise UserError(f"tokenizer {spec} names no end-of-document (EOS) token, which packing puts after every "
                        "document.",
                        f"put a tokenizer_config.json with \"eos_token\" beside it, or give it a special token named one "
                        f"of {list(EOS_NAMES)}.")
    return HFTokenizer(backend.to_str(), eos, path, str(spec).strip(), specials)


def _from_folder(path: str, spec: str) -> HFTokenizer:
    from transformers import AutoTokenizer

    config = Path(path, "tokenizer_config.json")
    if config.is_file() and "bll_ds_source" in json.loads(config.read_text()):  # saved by `save`: read as is
        return HFTokenizer.load(path, str(spec).strip())
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ImportError, ... for unusable folders
        raise UserError(f"{spec} is not a Hugging Face tokenizer folder that loads offline "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).",
                        "pass a folder written by save_pretrained (tokenizer.json or tokenizer.model + "
                        "tokenizer_config.json), or a tokenizer.json file.") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{spec} loads as a slow tokenizer ({type(tok).__name__}) with no tokenizers backend.",
                        "save it as a fast tokenizer (tokenizer.json), e.g. AutoTokenizer.from_pretrained(..., "
                        "use_fast=True).save_pretrained(folder).")
    if not tok.eos_token:
        raise UserError(f"tokenizer {spec} has no EOS token, which packing puts after every document.",
                        "set \"eos_token\" in its tokenizer_config.json.")
    specials = {name: getattr(tok, name, None) for name in _SPECIALS}
    return HFTokenizer(backend.to_str(), str(tok.eos_token), path, str(spec).strip(),
                       {k: str(v) for k, v in specials.items() if v})


def _config_specials(config: dict) -> dict:
    out = {}
    for name in _SPECIALS:
        value = config.get(name)
        if isinstance(value, dict):  # {"content": "</s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str) and value:
            out[name] = value
    return out


def transformers_tokenizer(folder: str):
    """A saved `HF_TOKENIZER` folder as a transformers tokenizer (for use.py's export and generate);
    encode with ``add_special_tokens=False`` to get the ids the run trained on."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
