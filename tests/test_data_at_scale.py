"""Data at scale: the streamed prepare command, --data tokens:DIR, --text_field, Hugging Face tokenizers.

The prepared folder must hold exactly the token stream the in-memory path (load_corpus ->
build_tokenizer -> prepare_token_streams) makes for the same documents, split the same way; a
partial folder must be refused with a clear error; readers must stream; an HF tokenizer.json must
encode as the tokenizers library does; and a run must train from the folder. CPU only, offline.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import pickle
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets / transformers are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import REPO, launch_failure, run_pretrain, run_script, train_losses  # noqa: E402

from bll_ds.data import (EvalBatches, MicroBatchSampler, ShardedTokens, build_tokenizer, documents,  # noqa: E402
                         load_corpus, load_run_tokenizer, open_token_dir, packing, parse_tokenizer_spec,
                         prepare_token_streams)
from bll_ds.data import prepare_tokens as prep  # noqa: E402
from bll_ds.data import tokenizer as tokenizer_mod  # noqa: E402
from bll_ds.data.hf_tokenizer import HFTokenizer, transformers_tokenizer  # noqa: E402
from bll_ds.data.shards import MANIFEST, check_tokenizer_flag  # noqa: E402
from bll_ds.infra.errors import UserError  # noqa: E402

FIELD = "body"


def _doc(i: int) -> str:
    return (f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (i % 5 + 1)
            + f"# note {i}: the quick brown fox {'jumps ' * (i % 3)}\n")


DOCS = [_doc(i) for i in range(45)]


def _write_jsonl(path, docs, field=FIELD):
    rows = [{field: d, "text": "WRONG FIELD", "id": i} for i, d in enumerate(docs)]
    rows.insert(5, {field: "", "text": "empty doc, dropped"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _concat(folder, split):
    manifest = json.loads((folder / MANIFEST).read_text())
    parts = [np.fromfile(folder / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=manifest["dtype"])


def _prepare(data, out, tokenizer, **kwargs):
    kwargs.setdefault("text_field", FIELD)
    return prep.prepare_tokens(str(data), str(tokenizer), str(out), log=None, **kwargs)


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("src") / "corpus.jsonl", DOCS)


@pytest.fixture(scope="module")
def prepared(jsonl, tmp_path_factory):
    """The jsonl prepared with a bpe tokenizer trained by the command, in shards of 500 tokens."""
    out = tmp_path_factory.mktemp("prepared") / "tokens"
    manifest = _prepare(jsonl, out, "bpe:300", shard_tokens=500)
    return out, manifest


# ---------------------------------------------------------------- the prepare command


def test_prepared_shards_equal_the_in_memory_path(prepared, jsonl, tmp_path):
    out, manifest = prepared
    corpus = load_corpus(str(jsonl), text_field=FIELD)
    assert corpus.train[0] == DOCS[0] and len(corpus.val) == len(DOCS) // 10  # every 10th document
    # The command's tokenizer sample is the whole training split here: the same tokenizer as the run's.
    tok = build_tokenizer("bpe:300", corpus.train, str(tmp_path / "run"))
    assert tok.fingerprint == manifest["tokenizer"]["fingerprint"]
    streams = prepare_token_streams(corpus, tok, str(tmp_path / "cache"), num_proc=1)
    for split, stream in (("train", streams.train), ("val", streams.val)):
        np.testing.assert_array_equal(_concat(out, split), np.asarray(stream))
    assert manifest["dtype"] == "uint16" and manifest["byte_order"] == "little"
    assert manifest["documents"] == {"documents": 45, "train": 41, "val": 4}
    assert manifest["text_field"] == FIELD and manifest["held_out"]["val_every"] == 10
    assert manifest["source"] == str(jsonl) and manifest["source_name"].startswith("file:")
    assert (out / "tokenizer.model").is_file() and manifest["tokenizer"]["file"] == "tokenizer.model"
    assert not [p for p in os.listdir(out) if ".tmp." in p]


def test_shards_split_at_shard_tokens(prepared):
    out, manifest = prepared
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}_{i:05d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
        assert sum(s["tokens"] for s in shards) == manifest["splits"][split]["tokens"]
        for s in shards:
            assert os.path.getsize(out / s["file"]) == 2 * s["tokens"]
    assert len(manifest["splits"]["train"]["shards"]) > 3


def test_workers_and_long_documents_give_the_same_stream(jsonl, tmp_path, monkeypatch, prepared):
    """A process pool, and documents cut into chunks (packing's rule, EOS after the last only)."""
    out, manifest = prepared
    tokenizer = str(out / "tokenizer.model")
    pooled = _prepare(jsonl, tmp_path / "pooled", tokenizer, shard_tokens=700, workers=2)
    monkeypatch.setattr(packing, "CHUNK_CHARS", 60)
    monkeypatch.setattr(prep, "CHUNK_CHARS", 60)
    monkeypatch.setattr(prep, "BATCH_ROWS", 7)
    _prepare(jsonl, tmp_path / "chunked", tokenizer, shard_tokens=10**6)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_concat(tmp_path / "pooled", split), _concat(out, split))
        np.testing.assert_array_equal(_concat(tmp_path / "chunked", split), _concat(out, split))
    assert pooled["tokenizer"]["fingerprint"] == manifest["tokenizer"]["fingerprint"]


def test_val_every_and_max_documents(jsonl, tmp_path, prepared):
    out, _ = prepared
    tok = load_run_tokenizer(out)
    manifest = _prepare(jsonl, tmp_path / "d", out / "tokenizer.model", val_every=4, max_documents=20)
    assert manifest["documents"] == {"documents": 20, "train": 15, "val": 5}
    expected = {False: [], True: []}
    for i, d in enumerate(DOCS[:20]):
        expected[i % 4 == 3] += tok.encode(d) + [tok.eos_id]
    assert _concat(tmp_path / "d", "train").tolist() == expected[False]
    assert _concat(tmp_path / "d", "val").tolist() == expected[True]
    with pytest.raises(UserError, match="leaves no validation"):
        _prepare(jsonl, tmp_path / "few", out / "tokenizer.model", max_documents=5)


def test_killed_prepare_leaves_no_manifest_and_is_redone(jsonl, tmp_path, monkeypatch, prepared):
    out, _ = prepared
    folder = tmp_path / "killed"
    real, calls = prep._encode, []

    def dies_on_third_batch(tok, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(tok, batch)

    monkeypatch.setattr(prep, "_encode", dies_on_third_batch)
    monkeypatch.setattr(prep, "BATCH_ROWS", 5)
    with pytest.raises(KeyboardInterrupt):
        _prepare(jsonl, folder, out / "tokenizer.model", shard_tokens=100)
    assert not (folder / MANIFEST).exists() and list(folder.glob("train_*.bin"))  # some shards were renamed
    assert not [p for p in os.listdir(folder) if ".tmp." in p]
    with pytest.raises(UserError) as e:
        open_token_dir(f"tokens:{folder}")
    assert "no tokens.json" in str(e.value) and "prepare_tokens" in str(e.value) and "Fix:" in str(e.value)

    monkeypatch.setattr(prep, "_encode", real)
    (folder / "notes.txt").write_text("not ours")
    _prepare(jsonl, folder, out / "tokenizer.model", shard_tokens=100)  # starts over
    assert (folder / "notes.txt").exists()
    np.testing.assert_array_equal(_concat(folder, "train"), _concat(out, "train"))
    with pytest.raises(UserError, match="already holds prepared tokens"):
        _prepare(jsonl, folder, out / "tokenizer.model")


def test_damaged_folders_are_clear_errors(prepared, tmp_path):
    out, manifest = prepared
    with pytest.raises(UserError, match="does not exist"):
        open_token_dir(f"tokens:{tmp_path / 'nowhere'}")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest["splits"]["train"]["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(UserError, match="short"):
        open_token_dir(f"tokens:{copy}")
    shard.unlink()
    with pytest.raises(UserError, match="is missing"):
        open_token_dir(f"tokens:{copy}")
    with pytest.raises(UserError, match="already tokenized"):
        load_corpus(f"tokens:{out}")


def test_prepare_option_and_source_errors(jsonl, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _prepare(tmp_path / "missing.jsonl", tmp_path / "o", "bpe:300")
    with pytest.raises(UserError, match="--val_every"):
        _prepare(jsonl, tmp_path / "o", "bpe:300", val_every=1)
    with pytest.raises(UserError) as e:
        _prepare(jsonl, tmp_path / "o", "bpe:300", text_field="content")
    assert '"content" field' in str(e.value) and "--text_field" in str(e.value)


def test_command_line_entry(jsonl, tmp_path, prepared):
    out, _ = prepared
    rc = prep.main(["--data", str(jsonl), "--tokenizer", str(out / "tokenizer.model"), "--out", str(tmp_path / "cli"),
                    "--text_field", FIELD, "--shard_tokens", "1000", "--max_documents", "30"])
    assert rc == 0 and json.loads((tmp_path / "cli" / MANIFEST).read_text())["documents"]["documents"] == 30
    assert prep.main(["--data", str(jsonl), "--tokenizer", "bpe:300", "--out", str(tmp_path / "cli")]) == 2


def test_prepare_script_help_documents_every_flag(monkeypatch, repo, capsys):
    import argparse
    import runpy

    monkeypatch.syspath_prepend(str(repo / "scripts"))
    main = runpy.run_path(str(repo / "scripts" / "prepare_data.py"), run_name="help_check")["main"]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = prep.build_parser()
    flags = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
             and a.help != argparse.SUPPRESS]  # --workers, the former name of --tokenize_workers, is hidden
    assert all(a.help and len(a.help) > 10 for a in flags)
    with_default = [a for a in flags if not a.required and a.default is not None]
    assert text.count("(default:") >= len(with_default) and "--shard_tokens" in text and "--text_field" in text
    assert "(default: None)" not in text and "--tokenize_workers" in text and "--workers" not in text


# ---------------------------------------------------------------- streaming readers


def test_readers_are_generators_and_lazy(tmp_path):
    for fn in (documents.iter_documents, documents.iter_file_documents, documents.iter_jsonl,
               documents.iter_parquet, documents.iter_hub_documents, documents.iter_dataset_texts):
        assert inspect.isgeneratorfunction(fn), fn.__name__
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n{broken\n")
    assert list(itertools.islice(documents.iter_documents(str(bad)), 2)) == ["one", "two"]  # line 3 never read
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        list(documents.iter_documents(str(bad)))


def test_parquet_streams_row_groups_and_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({FIELD: DOCS[:23], "text": ["x"] * 23}), path, row_group_size=5)
    assert pq.ParquetFile(path).num_row_groups == 5
    assert list(documents.iter_parquet(str(path), FIELD)) == DOCS[:23]
    corpus = load_corpus(str(path), text_field=FIELD)
    assert corpus.val == [DOCS[9], DOCS[19]]
    assert load_corpus(str(path)).name != corpus.name  # another field is another cache key
    with pytest.raises(UserError, match=r'no "content" column .*--text_field'):
        list(documents.iter_parquet(str(path), "content"))


def test_datasets_streaming_dataset_through_the_same_path(jsonl, tmp_path, prepared, monkeypatch):
    import datasets

    out, _ = prepared
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    _prepare("local-json", tmp_path / "ds", out / "tokenizer.model", shard_tokens=500,
             documents=lambda: documents.iter_dataset_texts(ds, FIELD))
    for split in ("train", "val"):
        np.testing.assert_array_equal(_concat(tmp_path / "ds", split), _concat(out, split))

    # A hub name goes through load_dataset(name, config, split=..., streaming=True).
    real, seen = datasets.load_dataset, []

    def local_hub(name, config=None, **kwargs):
        seen.append((name, config, kwargs))
        return real("json", data_files=str(jsonl), split=kwargs["split"], streaming=kwargs["streaming"])

    monkeypatch.setattr(datasets, "load_dataset", local_hub)
    manifest = _prepare("someone/corpus:cfg", tmp_path / "hub", out / "tokenizer.model", shard_tokens=500)
    assert seen[0] == ("someone/corpus", "cfg", {"split": "train", "streaming": True})
    assert manifest["source_name"] == "hub:someone/corpus:cfg" and manifest["split"] == "train"
    np.testing.assert_array_equal(_concat(tmp_path / "hub", "train"), _concat(out, "train"))
    with pytest.raises(UserError, match='no "content" column'):
        list(documents.iter_dataset_texts(ds, "content"))


def test_load_corpus_default_field_unchanged(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    corpus = load_corpus(str(path))
    assert corpus.val == ["doc 9"] and "#field=" not in corpus.name
    with pytest.raises(UserError, match='no "body" field'):
        load_corpus(str(path), text_field="body")


# ---------------------------------------------------------------- ShardedTokens


def test_sharded_tokens_read_across_boundaries(prepared):
    out, _ = prepared
    token_dir = open_token_dir(f"tokens:{out}")
    flat = _concat(out, "train")
    tokens = token_dir.train
    assert len(tokens) == len(flat) and len(tokens.paths) > 3
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = int(rng.integers(0, len(flat)))
        b = int(rng.integers(a, min(len(flat), a + 1200) + 1))
        np.testing.assert_array_equal(tokens[a:b], flat[a:b])
    assert tokens[499] == flat[499] and tokens[-1] == flat[-1] and tokens[500:500].size == 0
    np.testing.assert_array_equal(tokens[495:505], flat[495:505])  # straddles shards 0 and 1
    with pytest.raises(IndexError):
        tokens[len(flat)]
    small = ShardedTokens([out / "train_00000.bin", out / "train_00001.bin"], [500, 500], np.dtype("<u2"))
    np.testing.assert_array_equal(small[:], flat[:1000])
    # The sampler and the evaluation read the same windows from shards as from one array.
    for step in range(6):
        for got, want in zip(MicroBatchSampler(tokens, 16, 2, seed=3).get(step, 1, 2),
                             MicroBatchSampler(flat, 16, 2, seed=3).get(step, 1, 2)):
            assert (got == want).all()
    for got, want in zip(EvalBatches(tokens, 16, 2, 3), EvalBatches(flat, 16, 2, 3)):
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all()


# ---------------------------------------------------------------- Hugging Face tokenizers


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    """A tiny byte-level BPE trained with the tokenizers library, with an <|endoftext|> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(DOCS, trainer)
    tk.add_tokens(["<extra_token>"])
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tk.save(str(path))
    return path


def test_hf_tokenizer_json_encodes_as_the_tokenizers_library(hf_json, tmp_path, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setattr(tokenizer_mod, "_train", lambda *a, **k: pytest.fail("trained a tokenizer"))
    assert parse_tokenizer_spec(str(hf_json)) == ("hf", None)
    tok = build_tokenizer(str(hf_json), [], str(tmp_path / "run"))
    reference = Tokenizer.from_file(str(hf_json))
    assert isinstance(tok, HFTokenizer) and tok.path == str(tmp_path / "run" / "hf_tokenizer")
    assert tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert tok.eos_id == reference.token_to_id("<|endoftext|>")
    samples = DOCS[:5] + ["naïve café ✓ 😀 \r\n\t  x", "", "a <extra_token> b <|endoftext|>"]
    for text in samples:
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(samples) == [tok.encode(t) for t in samples]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.encode(DOCS[3]) == tok.encode(DOCS[3])
    # transformers reads the saved folder offline with the same ids (export, generate).
    hf = transformers_tokenizer(tok.path)
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id
    assert hf.encode(DOCS[7], add_special_tokens=False) == tok.encode(DOCS[7])
    # Reused in the same dir, found by load_run_tokenizer, and a different spec there is an error.
    assert build_tokenizer(str(hf_json), [], str(tmp_path / "run")).fingerprint == tok.fingerprint
    assert load_run_tokenizer(tmp_path / "run").fingerprint == tok.fingerprint
    with pytest.raises(UserError, match="already holds a tokenizer"):
        build_tokenizer("bpe:300", DOCS, str(tmp_path / "run"))


def test_hf_tokenizer_folder_and_eos_rules(hf_json, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(hf_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<pad>"}))
    tok = build_tokenizer(str(folder), [], str(tmp_path / "run"))
    assert tok.eos_id == Tokenizer.from_file(str(hf_json)).token_to_id("<pad>")  # the config's EOS

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(UserError) as e:
        build_tokenizer(str(tmp_path / "no_eos.json"), [], str(tmp_path / "run2"))
    assert "EOS" in str(e.value) and "eos_token" in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        parse_tokenizer_spec(str(tmp_path / "missing" / "tokenizer.json"))


def test_prepare_with_hf_tokenizer(hf_json, jsonl, tmp_path):
    manifest = _prepare(jsonl, tmp_path / "hf", hf_json, shard_tokens=800)
    tok = load_run_tokenizer(tmp_path / "hf")
    assert manifest["tokenizer"]["kind"] == "huggingface" and manifest["tokenizer"]["file"] == "hf_tokenizer"
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size and manifest["tokenizer"]["eos_id"] == tok.eos_id
    expected = [t for i, d in enumerate(DOCS) if i % 10 != 9 for t in tok.encode(d) + [tok.eos_id]]
    assert _concat(tmp_path / "hf", "train").tolist() == expected
    token_dir = open_token_dir(f"tokens:{tmp_path / 'hf'}")
    check_tokenizer_flag(str(hf_json), token_dir)  # the same tokenizer: accepted, also as the saved folder
    check_tokenizer_flag(str(tmp_path / "hf" / "hf_tokenizer"), token_dir)
    with pytest.raises(UserError, match="bll-ds run or prepared tokens folder"):
        parse_tokenizer_spec(str(tmp_path / "hf"))
    pooled = _prepare(jsonl, tmp_path / "hf_pooled", hf_json, shard_tokens=800, workers=2)
    assert pooled["splits"] == manifest["splits"]
    np.testing.assert_array_equal(_concat(tmp_path / "hf_pooled", "val"), _concat(tmp_path / "hf", "val"))
    check_tokenizer_flag("bpe:4096", token_dir)  # a trained kind: ignored


def test_tokenizer_flag_must_match_the_folder(prepared, tmp_path):
    out, _ = prepared
    token_dir = open_token_dir(f"tokens:{out}")
    check_tokenizer_flag(str(out / "tokenizer.model"), token_dir)
    other = build_tokenizer("char", DOCS, str(tmp_path / "other"))
    with pytest.raises(UserError, match="is not the tokenizer"):
        check_tokenizer_flag(other.path, token_dir)


# ---------------------------------------------------------------- training from tokens:DIR


def _pretrain(data: str, out, cache, extra=()):
    args = ["--emulate", "--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
            "--data", data, "--steps", "2", "--seq_len", "32", "--stages", "2", "--log_interval", "1",
            "--eval_interval", "0", "--final_eval_batches", "2", "--save_interval", "0",
            "--no-measure_matmul_peak", "--trace_steps", "0", "--out", str(out), *extra]
    result = run_pretrain(args, ranks=None, cache_dir=cache)
    assert result.returncode == 0, launch_failure(result)
    return json.loads((out / "summary.json").read_text())


def test_pretrain_from_tokens_dir_equals_the_in_memory_run(prepared, jsonl, tmp_path):
    """The same documents, tokenizer and split either way: the same losses, step for step."""
    out, manifest = prepared
    from_tokens = _pretrain(f"tokens:{out}", tmp_path / "tokens_run", tmp_path / "cache")
    run = tmp_path / "tokens_run"
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # nothing tokenized at run time
    assert load_run_tokenizer(run).fingerprint == manifest["tokenizer"]["fingerprint"]
    assert json.loads((run / "model_config.json").read_text())["vocab_size"] == manifest["tokenizer"]["vocab_size"]
    in_memory = _pretrain(str(jsonl), tmp_path / "memory_run", tmp_path / "cache2",
                          ["--text_field", FIELD, "--tokenizer", "bpe:300"])
    assert np.isfinite(from_tokens["val_loss"]) and from_tokens["val_loss"] == in_memory["val_loss"]
    assert train_losses(run) == train_losses(tmp_path / "memory_run")
    # evaluate.py reads the same shards (no tokenization) and reproduces the run's final loss.
    evaluated = run_script(REPO / "scripts/evaluate.py", [str(run), "--batches", "2", "--json",
                                                          str(tmp_path / "eval.json")], timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["data"] == f"tokens:{out}" and result["loss"] == pytest.approx(from_tokens["val_loss"], rel=1e-4)
