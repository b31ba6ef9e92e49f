"""Corpus loading: sources, held-out split rules, the embedded default corpus, input errors."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bll_ds.data import DEFAULT_CORPUS_MAX_BYTES, default_corpus_files, load_corpus
from bll_ds.infra.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
REPO = Path(__file__).resolve().parents[1]


def test_single_file_val_is_last_tenth_of_characters(tmp_path):
    if SHAKESPEARE.exists():
        path, text = SHAKESPEARE, SHAKESPEARE.read_text(encoding="utf-8")
    else:  # still test the rule without the shared file
        text = "".join(f"line {i}: to be or not to be\n" for i in range(1000))
        path = tmp_path / "one.txt"
        path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path))
    cut = int(len(text) * 0.9)  # nanoGPT's split
    assert corpus.train == [text[:cut]]
    assert corpus.val == [text[cut:]]
    if SHAKESPEARE.exists():
        assert len(corpus.val[0]) == 111540  # 10% of 1,115,394 characters


def _write_docs(folder: Path, n: int) -> list[str]:
    docs = []
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")  # nested folders; sorted path order decides doc order
        sub.mkdir(parents=True, exist_ok=True)
        doc = f"document {i}\n" * (i + 1)
        (sub / f"doc{i:02d}.txt").write_text(doc)
        docs.append((str(sub / f"doc{i:02d}.txt"), doc))
    return [d for _, d in sorted(docs)]


def test_folder_every_tenth_document_is_val(tmp_path):
    docs = _write_docs(tmp_path, 25)
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    corpus = load_corpus(str(tmp_path))
    assert corpus.val == [docs[9], docs[19]]
    assert corpus.train == [d for i, d in enumerate(docs) if i % 10 != 9]
    assert "hidden" not in "".join(corpus.train + corpus.val)


def test_few_documents_fall_back_to_character_split(tmp_path):
    docs = _write_docs(tmp_path, 3)
    corpus = load_corpus(str(tmp_path))
    assert len(corpus.val) == 3 and [t + v for t, v in zip(corpus.train, corpus.val)] == docs


def test_glob_pattern(tmp_path):
    _write_docs(tmp_path, 12)
    corpus = load_corpus(str(tmp_path / "a" / "*.txt"))  # a/ holds the odd-numbered documents
    expected = [f"document {i}\n" * (i + 1) for i in range(1, 12, 2)]
    assert [t + v for t, v in zip(corpus.train, corpus.val)] == expected  # 6 docs < 10: character split
    with pytest.raises(UserError, match="matches no files"):
        load_corpus(str(tmp_path / "*.nothing"))


def test_jsonl_documents_and_errors(tmp_path):
    rows = [{"text": f"doc {i}", "id": i} for i in range(20)] + [{"text": ""}]
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_corpus(str(good))
    assert corpus.val == ["doc 9", "doc 19"] and len(corpus.train) == 18  # empty doc dropped

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x", "title": "y"}) + "\n")
    with pytest.raises(UserError) as e:
        load_corpus(str(bad))
    assert "line 2" in str(e.value) and "'body', 'title'" in str(e.value) and "Fix:" in str(e.value)

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "x"\n')
    with pytest.raises(UserError, match="not valid JSON"):
        load_corpus(str(broken))


def test_parquet_documents_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), tmp_path / "d.parquet")
    corpus = load_corpus(str(tmp_path / "d.parquet"))
    assert corpus.val == ["row 9"] and corpus.train == [f"row {i}" for i in range(9)]

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"no \"text\" column \(columns present: \['content'\]\)"):
        load_corpus(str(tmp_path / "bad.parquet"))


@pytest.mark.parametrize("spec", ["./nope", "nope.txt", "/definitely/not/here", "data/sub/x", "~/nope.jsonl"])
def test_missing_path_is_user_error(spec):
    with pytest.raises(UserError) as e:
        load_corpus(spec)
    assert "does not exist" in str(e.value) and "Fix:" in str(e.value)


def test_non_utf8_file_is_user_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_corpus(str(tmp_path / "latin1.txt"))


def test_bogus_hub_name_is_user_error_and_fast():
    """Runs in a subprocess: the hub's offline switches are read when `datasets` is imported."""
    code = (
        "from bll_ds.data import load_corpus\n"
        "from bll_ds.infra.errors import UserError\n"
        "for spec in ['no_such_dataset_bll_xyz', 'nobody-bll/no_such_dataset:cfg']:\n"
        "    try:\n"
        "        load_corpus(spec)\n"
        "    except UserError as e:\n"
        "        print('USERERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30
    lines = [line for line in out.stdout.splitlines() if line.startswith("USERERROR")]
    assert len(lines) == 2, out.stdout + out.stderr
    assert "no_such_dataset_bll_xyz" in lines[0] and "Hugging Face" in lines[0] and "Fix:" in lines[0]


def test_default_corpus_is_stdlib_without_tests_and_deterministic():
    paths, texts = default_corpus_files()
    assert len(paths) > 200
    for p in paths:
        parts = set(Path(p).parts)
        assert p.endswith(".py")
        assert not parts & {"test", "tests", "idle_test", "site-packages", "dist-packages"}, p
    assert sum(len(t.encode()) for t in texts) <= DEFAULT_CORPUS_MAX_BYTES

    a, b = load_corpus(None), load_corpus(None)
    assert a.name == b.name and a.train == b.train and a.val == b.val
    assert len(a.train) + len(a.val) == len(paths) and a.val == texts[9::10]

    small = load_corpus(None, default_max_bytes=500_000)
    assert len(small.train) < len(a.train) and small.name != a.name


def test_name_changes_when_file_changes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world\n" * 10)
    first = load_corpus(str(f)).name
    assert load_corpus(str(f)).name == first
    f.write_text("hello there\n" * 11)
    assert load_corpus(str(f)).name != first
