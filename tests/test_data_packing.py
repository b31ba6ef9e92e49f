"""Token streams: EOS placement, cache reuse and keying, atomic writes, chunking, dtypes."""

import os
from pathlib import Path

import numpy as np
import pytest

from bll_ds.data import Corpus, build_tokenizer, prepare_token_streams, token_dtype, token_windows_available
from bll_ds.data import packing

SHAKESPEARE = str(Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
DOCS = [f"def f{i}(x):\n    return x + {i}\n" * (i % 4 + 1) for i in range(30)]


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    return build_tokenizer("char", DOCS, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return build_tokenizer("bpe:300", DOCS * 3, str(tmp_path_factory.mktemp("bpe")))


def _expected(tok, docs):
    return [t for d in docs for t in tok.encode(d) + [tok.eos_id]]


def test_eos_after_every_document(tmp_path, bpe_tok):
    corpus = Corpus(name="t", train=DOCS[:20], val=DOCS[20:])
    streams = prepare_token_streams(corpus, bpe_tok, str(tmp_path), num_proc=1)
    assert streams.train.tolist() == _expected(bpe_tok, DOCS[:20])
    assert streams.val.tolist() == _expected(bpe_tok, DOCS[20:])
    assert int((streams.train == bpe_tok.eos_id).sum()) == 20
    assert streams.train.dtype == np.uint16 and isinstance(streams.train, np.memmap)
    with pytest.raises(ValueError):
        streams.train[0] = 1  # read-only: a shared cache must never be modified in place


def test_multiprocess_matches_single_process(tmp_path, bpe_tok):
    a = prepare_token_streams(Corpus("a", DOCS, DOCS[:3]), bpe_tok, str(tmp_path / "a"), num_proc=1)
    b = prepare_token_streams(Corpus("a", DOCS, DOCS[:3]), bpe_tok, str(tmp_path / "b"), num_proc=2)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)


def test_few_documents_run_in_process(tmp_path, char_tok, monkeypatch):
    import datasets

    seen = []
    original = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    prepare_token_streams(Corpus("one", [DOCS[0]], [DOCS[1], DOCS[2]]), char_tok, str(tmp_path), num_proc=2)
    assert seen == [None, None]  # num_proc=1 would still start a pool in datasets


def test_cache_is_reused_and_keyed(tmp_path, char_tok, bpe_tok, monkeypatch):
    corpus = Corpus(name="c", train=DOCS[:10], val=DOCS[10:12])
    first = prepare_token_streams(corpus, char_tok, str(tmp_path))
    mtime = os.stat(first.train_path).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache exists")

    monkeypatch.setattr(packing, "_tokenize_to_file", fail)
    second = prepare_token_streams(corpus, char_tok, str(tmp_path))
    assert second.train_path == first.train_path and os.stat(second.train_path).st_mtime_ns == mtime
    assert np.array_equal(first.train, second.train)
    monkeypatch.undo()

    other_tok = prepare_token_streams(corpus, bpe_tok, str(tmp_path))
    other_data = prepare_token_streams(Corpus("c2", DOCS[:10], DOCS[10:12]), char_tok, str(tmp_path))
    assert len({first.train_path, other_tok.train_path, other_data.train_path, first.val_path}) == 4


def test_no_temp_files_and_no_half_cache_on_failure(tmp_path, char_tok, monkeypatch):
    prepare_token_streams(Corpus("ok", DOCS[:5], DOCS[5:6]), char_tok, str(tmp_path))
    assert sorted(p.split("-")[1] for p in os.listdir(tmp_path)) == ["train", "val"]

    def boom(self, batch):
        raise RuntimeError("killed mid-tokenization")

    monkeypatch.setattr(packing._Encode, "__call__", boom)
    with pytest.raises(RuntimeError):
        prepare_token_streams(Corpus("broken", DOCS[:5], DOCS[5:6]), char_tok, str(tmp_path), num_proc=1)
    assert len(os.listdir(tmp_path)) == 2  # nothing new: no partial cache, no temp file


def test_long_documents_are_chunked_without_changing_ids(tmp_path, char_tok, bpe_tok, monkeypatch):
    long_doc = "".join(DOCS)
    monkeypatch.setattr(packing, "CHUNK_CHARS", 100)
    texts, ends = packing._chunk_documents([long_doc, "short"])
    assert len(texts) > 10 and "".join(texts) == long_doc + "short" and sum(ends) == 2
    assert all(t.endswith("\n") for t, e in zip(texts, ends) if not e)
    for tok in (char_tok, bpe_tok):
        s = prepare_token_streams(Corpus(f"long-{tok.spec}", [long_doc, "short"], ["x"]), tok, str(tmp_path))
        assert s.train.tolist() == _expected(tok, [long_doc, "short"])


def test_empty_split_and_dtypes(tmp_path, char_tok):
    s = prepare_token_streams(Corpus("e", DOCS[:2], []), char_tok, str(tmp_path))
    assert len(s.val) == 0 and s.val.dtype == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_token_windows_available():
    assert token_windows_available(0, 8) == 0
    assert token_windows_available(8, 8) == 0  # a window needs seq_len + 1 tokens
    assert token_windows_available(9, 8) == 1
    assert token_windows_available(17, 8) == 2  # windows [0, 9) and [8, 17) share one boundary token
    assert token_windows_available(1001, 10) == 100


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared Tiny Shakespeare file is absent")
def test_tiny_shakespeare_char_stream_is_the_text(tmp_path):
    from bll_ds.data import load_corpus

    corpus = load_corpus(SHAKESPEARE)
    tok = build_tokenizer("char", corpus.train, str(tmp_path / "tok"))
    s = prepare_token_streams(corpus, tok, str(tmp_path / "cache"))
    assert len(s.train) == len(corpus.train[0]) + 1 and len(s.val) == len(corpus.val[0]) + 1
    assert s.train[-1] == s.val[-1] == tok.eos_id
    assert tok.decode(s.train[:-1]) == corpus.train[0] and tok.decode(s.val[:-1]) == corpus.val[0]
