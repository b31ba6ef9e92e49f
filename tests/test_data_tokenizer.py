"""Tokenizers: exact round trips (Python indentation included), vocab sizes, reuse, spec errors."""

import os
import pickle
import shutil
from pathlib import Path

import pytest

from bll_ds.data import build_tokenizer, parse_tokenizer_spec
from bll_ds.data import tokenizer as tokenizer_mod
from bll_ds.infra.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"shared data file {SHAKESPEARE} is absent")

PY_SNIPPET = (
    "class Stack:\n"
    "    def __init__(self):\n"
    "        self.items = []  # two  spaces   three\n"
    "\n\n"
    "\tdef push(self, x):\t# tab-indented\n"
    "\t\tself.items.append(x)\n"
    "        \n"  # whitespace-only line
    "    return {'a': 1,    'b': 22, 'c': 333}\n"
)
EDGE_CASES = ["", "\n", "\n\n\n", "   leading spaces", "trailing  \n  ", "\t\t\n    \n", " a  b   c    d\n"]


def _shakespeare_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def train_docs(text_corpus):
    """Real text: Tiny Shakespeare, or the standard-library fallback where ../shared is absent."""
    return [text_corpus.read_text(encoding="utf-8")[:60_000], PY_SNIPPET * 20]


@pytest.fixture(scope="module", params=["char", "bpe:400", "unigram:400"])
def tok(request, train_docs, tmp_path_factory):
    return build_tokenizer(request.param, train_docs, str(tmp_path_factory.mktemp("tok")))


def test_round_trip_training_text(tok, train_docs):
    samples = [PY_SNIPPET, *EDGE_CASES, train_docs[0][:5000], train_docs[0][-3000:]]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]
    assert tok.eos_id == 2 and tok.bos_id == 1 and tok.unk_id == 0
    assert tok.id_to_piece(tok.encode("\n")[0]) == "\n"  # newline is one dedicated token


def test_subword_models_compress_and_byte_fallback(tok, train_docs):
    if tok.spec == "char":
        assert len(tok.encode(PY_SNIPPET)) == len(PY_SNIPPET)
        return
    assert tok.vocab_size == 400
    assert len(tok.encode(train_docs[0])) < 0.7 * len(train_docs[0])
    unseen = "naïve café ✓ 😀 \r\n\x00 end"  # characters never seen in training
    assert tok.decode(tok.encode(unseen)) == unseen
    assert tok.encode("12345") == [tok.encode(d)[0] for d in "12345"]  # split_digits


def test_tokenizer_pickles_by_value(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.encode(PY_SNIPPET) == tok.encode(PY_SNIPPET)


@needs_shakespeare
def test_char_vocab_on_tiny_shakespeare(tmp_path):
    text = _shakespeare_text()
    tok = build_tokenizer("char", [text], str(tmp_path))
    assert len(set(text)) == 65
    assert tok.vocab_size == len(set(text)) + 3
    assert tok.decode(tok.encode(text[:20000])) == text[:20000]


def test_char_keeps_characters_sentencepiece_would_drop(tmp_path):
    text = "ab\r\ncd\x1fe\x0cf\u2028g\th  i\n" * 5
    tok = build_tokenizer("char", [text], str(tmp_path))
    assert tok.vocab_size == len(set(text)) + 3
    assert tok.decode(tok.encode(text)) == text
    with_nul = build_tokenizer("char", [text + "\x00"], str(tmp_path / "nul"))  # NUL: documented <unk>
    assert with_nul.encode("\x00") == [with_nul.unk_id]


def test_reuse_same_spec_without_retraining(tmp_path, train_docs, monkeypatch):
    first = build_tokenizer("bpe:400", train_docs, str(tmp_path))
    mtime = os.stat(first.path).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a matching tokenizer was saved")

    monkeypatch.setattr(tokenizer_mod, "_train", no_training)
    again = build_tokenizer("bpe:400", ["completely different text"], str(tmp_path))
    assert again.fingerprint == first.fingerprint and os.stat(again.path).st_mtime_ns == mtime

    with pytest.raises(UserError, match="already holds a tokenizer built from spec 'bpe:400'"):
        build_tokenizer("unigram:400", train_docs, str(tmp_path))


def test_interrupted_build_is_redone(tmp_path, train_docs):
    first = build_tokenizer("char", train_docs, str(tmp_path))
    os.remove(tmp_path / "tokenizer.json")  # as if killed between writing the model and its sidecar
    again = build_tokenizer("char", train_docs, str(tmp_path))
    assert again.fingerprint == first.fingerprint and (tmp_path / "tokenizer.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


def test_model_file_spec_is_copied(tmp_path, train_docs):
    src = build_tokenizer("char", train_docs, str(tmp_path / "a"))
    copy = build_tokenizer(src.path, [], str(tmp_path / "b"))
    assert copy.path == str(tmp_path / "b" / "tokenizer.model")
    assert copy.fingerprint == src.fingerprint and copy.vocab_size == src.vocab_size
    assert build_tokenizer(src.path, [], str(tmp_path / "b")).fingerprint == src.fingerprint  # reuse


@pytest.mark.parametrize("spec", ["gpt2", "bpe", "bpe:", "bpe:x", "wordpiece:1000", "char:10", "bpe:100", "missing.model"])
def test_bad_specs_are_user_errors(spec):
    with pytest.raises(UserError) as e:
        parse_tokenizer_spec(spec)
    assert "Fix:" in str(e.value)
    if spec in ("gpt2", "bpe:x", "wordpiece:1000"):
        assert "'char', 'bpe:N', 'unigram:N'" in str(e.value)


def test_vocab_too_large_for_text_is_user_error(tmp_path):
    with pytest.raises(UserError, match="sentencepiece could not train tokenizer unigram:5000"):
        build_tokenizer("unigram:5000", ["tiny text\n" * 10], str(tmp_path))


def test_non_model_file_is_user_error(tmp_path):
    fake = tmp_path / "fake.model"
    fake.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        build_tokenizer(str(fake), [], str(tmp_path / "out"))
    assert not (tmp_path / "out" / "tokenizer.model").exists()
    shutil.rmtree(tmp_path / "out")


def test_a_trained_tokenizer_is_cached_by_spec_and_training_text(tmp_path, train_docs, monkeypatch):
    """A second run dir on the same text copies the first one's trained tokenizer from the cache;
    other text, or a damaged cache entry, trains again."""
    from bll_ds.data import tokenizer as tokenizer_module

    trained = []
    real_train = tokenizer_module._train
    monkeypatch.setattr(tokenizer_module, "_train", lambda *a: trained.append(a[3]) or real_train(*a))
    cache = str(tmp_path / "cache")
    first = build_tokenizer("bpe:400", train_docs, str(tmp_path / "a"), cache_dir=cache)
    second = build_tokenizer("bpe:400", train_docs, str(tmp_path / "b"), cache_dir=cache)
    assert trained == ["bpe:400"] and second.fingerprint == first.fingerprint
    build_tokenizer("bpe:400", train_docs[:-1], str(tmp_path / "c"), cache_dir=cache)
    assert trained == ["bpe:400", "bpe:400"]
    for entry in (tmp_path / "cache" / "tokenizers").iterdir():
        entry.write_bytes(b"damaged")
    again = build_tokenizer("bpe:400", train_docs, str(tmp_path / "d"), cache_dir=cache)
    assert len(trained) == 3 and again.fingerprint == first.fingerprint
