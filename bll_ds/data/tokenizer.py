"""SentencePiece tokenizers that round-trip raw text exactly, trained once per run directory.

Specs accepted by `build_tokenizer`:

* ``char``: one token per distinct character of the training text (plus the specials). The
  classic setting for Tiny Shakespeare (65 characters -> vocab 68), comparable with nanoGPT.
* ``bpe:N`` / ``unigram:N``: a subword vocabulary of N pieces trained on the training documents.
  N must leave room for the 3 specials, the 256 byte-fallback pieces and every distinct character
  (sentencepiece reports the minimum if N is too small).
* a path to an existing ``.model`` file: copied into the run directory and used as is.
* a Hugging Face ``tokenizer.json`` file or a local tokenizer folder: loaded offline, wrapped by
  hf_tokenizer.py's `HFTokenizer` (same interface), and saved in the run directory as
  ``hf_tokenizer/``; nothing is trained. The round-trip guarantees below are then the tokenizer's own.

Why these trainer options: language-model pretraining needs ``decode(encode(text)) == text``, or
the model is trained on text that is not what the user gave it. Sentencepiece defaults normalise
Unicode (NFKC), collapse repeated spaces, prepend a space and drop newlines -- fatal for Python
source, where indentation and line breaks carry meaning. So: identity normalisation, no
whitespace collapsing, no dummy prefix, whitespace-only pieces allowed (runs of indentation become
single tokens), full character coverage, digits split (numbers generalise better digit by digit),
and byte fallback for bpe/unigram so characters never seen in training still round-trip as UTF-8
bytes. Sentencepiece trains on lines and drops the newline at their end, so ``"\\n"`` is a
user-defined symbol (always in the vocabulary, always its own token). For ``char`` (no byte
fallback), characters that sentencepiece would otherwise drop (``"\\r"``, NUL, ...) are found after
a first training pass and added as user-defined symbols in a second pass, so every training
character round-trips, except NUL, which becomes <unk>. Known limitation for all kinds: U+2581
("▁") is sentencepiece's internal space marker and decodes to a space.

Training reads at most `MAX_TRAIN_CHARS` characters (every k-th line across the whole training
set when it is larger), so tokenizer training stays bounded on big corpora.

Reuse and resume: the model is saved as ``<out_dir>/tokenizer.model`` (a Hugging Face one as
``<out_dir>/hf_tokenizer/``) with a sidecar ``tokenizer.json`` recording the spec, the kind and the
tokenizer's fingerprint (for sentencepiece the model's sha256). Building again with the same spec in
the same directory reuses the saved model without retraining (a resumed run must keep the exact
token ids its checkpoint was trained with). A *different* spec in a directory that already holds a
tokenizer is an error rather than a silent retrain, because the checkpoints there belong to the old
vocabulary. `adopt_tokenizer` installs an already built tokenizer (a prepared tokens folder's)
under the same rules, and `load_run_tokenizer` opens whichever kind a run directory holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

from bll_ds.infra.atomic import atomic_write_bytes
from bll_ds.infra.errors import UserError
from bll_ds.run.run_dir import HF_TOKENIZER, TOKENIZER_META, TOKENIZER_MODEL

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIALS = 3
MAX_TRAIN_CHARS = 20_000_000
_MAX_LINE_CHARS = 8192  # sentencepiece skips sentences longer than max_sentence_length bytes
_SPACE_MARKER = "\u2581"
_SPEC_FORMS = ("'char', 'bpe:N', 'unigram:N' (N an integer, e.g. bpe:8000), a path to an existing .model file, "
               "or a Hugging Face tokenizer.json file or tokenizer folder")


class Tokenizer:
    """A loaded sentencepiece model plus the facts the rest of the code needs about it.

    `fingerprint` (sha256 of the .model bytes) keys every token cache, so a different tokenizer can
    never read another's cached ids. Pickles by value (model bytes), so `datasets.map` worker
    processes can use it.
    """

    def __init__(self, path: str, spec: str | None = None, _proto: bytes | None = None):
        import sentencepiece as spm

        self.path = str(path)
        self.spec = spec if spec is not None else self.path
        self._proto = _proto if _proto is not None else Path(path).read_bytes()
        self.fingerprint = hashlib.sha256(self._proto).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts in one call (sentencepiece's C++ loop; threads optional)."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):
        return {"path": self.path, "spec": self.spec, "proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["path"], state["spec"], _proto=state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, path={self.path!r})"


def parse_tokenizer_spec(spec: str) -> tuple[str, int | None]:
    """('char', None) | ('bpe', N) | ('unigram', N) | ('file', None) | ('hf', None); UserError for
    anything else."""
    spec = str(spec).strip()
    if spec == "char":
        return "char", None
    m = re.fullmatch(r"(bpe|unigram):(\d+)", spec)
    if m:
        n = int(m.group(2))
        if n < NUM_SPECIALS + 256 + 1:
            raise UserError(
                f"tokenizer {spec}: a vocabulary of {n} cannot hold the {NUM_SPECIALS} special tokens, "
                "256 byte-fallback pieces and the characters of the text.",
                "use N of at least a few hundred (e.g. bpe:512 for tiny data, bpe:8000 or more for real runs), or 'char'.",
            )
        return m.group(1), n
    if spec.endswith(".model"):
        if not os.path.isfile(os.path.expanduser(spec)):
            raise UserError(f"tokenizer model file {spec} does not exist.", f"check the path, or use one of {_SPEC_FORMS}.")
        return "file", None
    from bll_ds.data.hf_tokenizer import is_hf_tokenizer_path

    folder = os.path.expanduser(spec)
    if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, TOKENIZER_META)) \
            and not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        raise UserError(f"{spec} is a bll-ds run or prepared tokens folder, not a tokenizer folder (its "
                        f"{TOKENIZER_META} is bll-ds's record, not a Hugging Face file).",
                        f"pass its {TOKENIZER_MODEL} or its {HF_TOKENIZER}/ folder; or, for a prepared folder, train "
                        "with --data tokens:DIR, which uses its tokenizer.")
    if is_hf_tokenizer_path(spec):
        if not os.path.exists(os.path.expanduser(spec)):
            raise UserError(f"tokenizer file {spec} does not exist.", f"check the path, or use one of {_SPEC_FORMS}.")
        return "hf", None
    if os.path.isdir(os.path.expanduser(spec)):
        raise UserError(f"tokenizer folder {spec} holds no tokenizer.json, tokenizer.model or tokenizer_config.json.",
                        f"pass a folder written by save_pretrained, or one of {_SPEC_FORMS}.")
    raise UserError(f"unknown tokenizer spec {spec!r}.", f"use one of {_SPEC_FORMS}.")


def build_tokenizer(spec: str, train_docs: list[str], out_dir: str, cache_dir: str | None = None):
    """Train (or reuse, or copy) the tokenizer named by `spec` into `out_dir`; see module docstring.
    Returns a `Tokenizer`, or an `HFTokenizer` for Hugging Face specs. cache_dir: where a trained
    tokenizer is kept by its spec and training text, so that the next run dir on the same corpus
    (a sweep, a rerun) copies it instead of training again (a BPE on a large corpus: minutes)."""
    kind, size = parse_tokenizer_spec(spec)
    spec = str(spec).strip()
    os.makedirs(out_dir, exist_ok=True)

    saved = saved_tokenizer(out_dir)
    if saved is not None:  # an intact tokenizer from an earlier run
        meta, tok = saved
        if meta.get("spec") != spec:
            raise UserError(
                f"{out_dir} already holds a tokenizer built from spec {meta.get('spec')!r}, but {spec!r} was asked for.",
                f"use --tokenizer {meta.get('spec')} to continue that run, or a fresh output directory for a new tokenizer.",
            )
        if (kind == "file" and _sha256_file(spec) != tok.fingerprint) or (kind == "hf" and _hf_source(spec).fingerprint != tok.fingerprint):
            raise UserError(
                f"{out_dir} holds a copy of {spec} that differs from the {'file' if kind == 'file' else 'tokenizer'} now at that path.",
                f"use a fresh output directory, or restore the original {'.model file' if kind == 'file' else 'tokenizer'}.",
            )
        tok.spec = spec
        return tok
    # no sidecar or a stale one: an interrupted build, so build again below

    data_digest = None
    if kind == "hf":
        return adopt_tokenizer(_hf_source(spec), out_dir, spec)
    if kind == "file":
        proto = Path(os.path.expanduser(spec)).read_bytes()
        try:
            Tokenizer("<check>", spec, _proto=proto)
        except Exception as e:
            raise UserError(f"{spec} is not a sentencepiece model ({e}).", f"pass a .model file written by sentencepiece, or one of {_SPEC_FORMS}.") from None
    else:
        lines = _training_lines(train_docs, MAX_TRAIN_CHARS)
        if not any(lines):
            raise UserError("the training split has no text to train a tokenizer on.", "use a corpus with text in its training documents.")
        if kind == "char":  # every character of the training split gets a token, sampled or not
            unseen = set().union(*map(set, train_docs)) - set().union(*map(set, lines))
            if unseen - {"\n"}:
                lines.append("".join(sorted(unseen - {"\n"})))
        data_digest = hashlib.sha256("".join(lines).encode("utf-8", "surrogatepass")).hexdigest()
        proto = _trained(kind, size, lines, spec, data_digest, cache_dir)
    return adopt_tokenizer(Tokenizer("<new>", spec, _proto=proto), out_dir, spec, data_digest)


def adopt_tokenizer(tok, out_dir: str, spec: str, train_text_sha256: str | None = None):
    """Install the built tokenizer `tok` (a `Tokenizer` or an `HFTokenizer`) as `out_dir`'s
    tokenizer: its files first, the sidecar last (atomic writes), so a kill in between leaves no
    sidecar and the next build redoes it. An `out_dir` that already holds an intact tokenizer keeps
    it if it is the same one (same fingerprint, whatever spec built it) and is an error otherwise:
    checkpoints there belong to that vocabulary. Returns the installed tokenizer, opened from
    `out_dir`."""
    from bll_ds.data.hf_tokenizer import HFTokenizer

    os.makedirs(out_dir, exist_ok=True)
    saved = saved_tokenizer(out_dir)
    if saved is not None:
        meta, current = saved
        if current.fingerprint != tok.fingerprint:
            raise UserError(
                f"{out_dir} already holds a different tokenizer (built from spec {meta.get('spec')!r}) than {spec!r}.",
                "use a fresh output directory, or the data and tokenizer that directory was started with.",
            )
        return current
    model_path = os.path.join(out_dir, TOKENIZER_MODEL)
    hf_path = os.path.join(out_dir, HF_TOKENIZER)
    if isinstance(tok, HFTokenizer):
        tok.save(out_dir)
        if os.path.exists(model_path):  # a stale one from an interrupted build of another kind
            os.remove(model_path)
        kind, installed = "huggingface", HFTokenizer.load(hf_path, spec)
    else:
        atomic_write_bytes(model_path, tok._proto)
        shutil.rmtree(hf_path, ignore_errors=True)
        kind, installed = "sentencepiece", Tokenizer(model_path, spec)
    meta = {"spec": spec, "kind": kind, "sha256": installed.fingerprint, "train_text_sha256": train_text_sha256}
    atomic_write_bytes(os.path.join(out_dir, TOKENIZER_META), (json.dumps(meta, indent=2) + "\n").encode())
    return installed


def saved_tokenizer(out_dir: str):
    """(sidecar, tokenizer) of the intact tokenizer saved in `out_dir`, or None when there is none
    or it is incomplete (no sidecar, or files that do not match its recorded fingerprint)."""
    from bll_ds.data.hf_tokenizer import HFTokenizer

    meta_path = os.path.join(out_dir, TOKENIZER_META)
    if not os.path.isfile(meta_path):
        return None
    try:
        meta = json.loads(Path(meta_path).read_text())
        if meta.get("kind") == "huggingface":
            tok = HFTokenizer.load(os.path.join(out_dir, HF_TOKENIZER), meta.get("spec"))
        else:  # sidecars from before Hugging Face tokenizers have no kind
            tok = Tokenizer(os.path.join(out_dir, TOKENIZER_MODEL), meta.get("spec"))
    except (OSError, ValueError, KeyError, RuntimeError, UserError):
        return None
    return (meta, tok) if meta.get("sha256") == tok.fingerprint else None


def open_tokenizer(path: str, spec: str | None = None):
    """The tokenizer saved at `path`: a sentencepiece ``.model`` file, or an `HF_TOKENIZER` folder."""
    if os.path.isdir(path):
        from bll_ds.data.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path, spec)
    return Tokenizer(path, spec)


def load_run_tokenizer(run_dir):
    """The tokenizer a run trained with (either kind), for evaluate and friends."""
    saved = saved_tokenizer(str(run_dir))
    if saved is not None:
        return saved[1]
    for name in (TOKENIZER_MODEL, HF_TOKENIZER):  # no intact sidecar: whichever file is there
        if os.path.exists(os.path.join(str(run_dir), name)):
            return open_tokenizer(os.path.join(str(run_dir), name))
    raise UserError(f"{run_dir} holds no tokenizer ({TOKENIZER_MODEL} or {HF_TOKENIZER}/).",
                    "pass the --out folder of a pretrain.py run.")


def _hf_source(spec: str):
    from bll_ds.data.hf_tokenizer import load_hf_source

    return load_hf_source(spec)


def _sha256_file(path: str) -> str:
    return hashlib.sha256(Path(os.path.expanduser(path)).read_bytes()).hexdigest()


def _training_lines(docs: list[str], max_chars: int) -> list[str]:
    """Lines (newline kept) of the docs, long lines chunked; every k-th line if over `max_chars`."""
    total = sum(len(d) for d in docs)
    stride = max(1, math.ceil(total / max_chars))
    out, i = [], 0
    for doc in docs:
        parts = doc.split("\n")
        for j, part in enumerate(parts):
            line = part + "\n" if j < len(parts) - 1 else part
            for k in range(0, len(line), _MAX_LINE_CHARS):
                if i % stride == 0:
                    out.append(line[k : k + _MAX_LINE_CHARS])
                i += 1
    return out


def _trained(kind: str, size: int | None, lines: list[str], spec: str, data_digest: str,
             cache_dir: str | None) -> bytes:
    """The trained model's bytes: from the cache when this spec was trained on this text before."""
    if cache_dir is None:
        return _train(kind, size, lines, spec)
    key = hashlib.sha256(f"{spec}\0{data_digest}".encode()).hexdigest()[:32]
    cached = Path(cache_dir) / "tokenizers" / f"{key}.model"
    if cached.is_file():
        proto = cached.read_bytes()
        try:
            Tokenizer("<cached>", spec, _proto=proto)
            return proto
        except Exception:  # a damaged cache entry is trained again and rewritten
            pass
    proto = _train(kind, size, lines, spec)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(str(cached), proto)
    return proto


def _train(kind: str, size: int | None, lines: list[str], spec: str) -> bytes:
    common = dict(
        model_type=kind,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        character_coverage=1.0,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,  # sentencepiece logs every training step to stderr otherwise
        max_sentence_length=1 << 16,
        input_sentence_size=0,  # already bounded by _training_lines
    )
    if kind == "char":
        chars = set().union(*map(set, lines)) | {"\n"}
        common.update(vocab_size=len(chars) + NUM_SPECIALS, hard_vocab_limit=False)
        proto = _run_trainer(lines, common, ["\n"], spec)
        # second pass for characters sentencepiece drops (e.g. "\r"), so all of them round-trip
        probe = Tokenizer("<probe>", spec, _proto=proto)
        # NUL cannot be passed to the trainer as a symbol (C strings); it stays <unk>.
        dropped = sorted(c for c in chars - {"\n", "\x00", ",", _SPACE_MARKER} if probe.decode(probe.encode(c)) != c)
        if dropped:
            proto = _run_trainer(lines, common, ["\n", *dropped], spec)
        return proto
    common.update(vocab_size=size, byte_fallback=True, split_digits=True)
    return _run_trainer(lines, common, ["\n"], spec)


def _run_trainer(lines: list[str], kwargs: dict, user_symbols: list[str], spec: str) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, user_defined_symbols=user_symbols, **kwargs)
    except RuntimeError as e:
        reason = str(e).split("] ", 1)[-1].strip() or repr(e)
        raise UserError(
            f"sentencepiece could not train tokenizer {spec} on this text: {reason}",
            "choose a vocabulary size this much text supports (the message above gives the limit), or use 'char'.",
        ) from None
    return out.getvalue()
