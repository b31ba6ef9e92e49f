"""Bad input through the real entry point: one clear line, a non-zero exit, no traceback, and no
half-written run dir. The first case runs in a fresh interpreter, as a user starts it; the others
are forked from helpers' server (the same script and arguments, without its 7 s of imports)."""

import json

import pytest

from helpers import run_pretrain

BASE = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
        "--stages", "1", "--tokenizer", "char", "--steps", "2", "--seq_len", "32"]


def check_refused(result, run_dir, *phrases):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(lines) == 1, result.stderr
    assert "Fix:" in lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists(), "a refused run must not leave a run dir behind"


def test_missing_data_path(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_pretrain(BASE + ["--data", str(tmp_path / "missing.txt"), "--out", str(out)], None, cache_dir,
                          fresh=True)
    check_refused(result, out, "missing.txt", "does not exist")


def test_unknown_tokenizer_spec(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    args = BASE + ["--data", str(text_corpus), "--out", str(out)]
    args[args.index("char")] = "wordpiece:100"
    check_refused(run_pretrain(args, None, cache_dir), out, "wordpiece:100")


def test_spec_that_cannot_be_cut_into_the_stages(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    args = BASE + ["--data", str(text_corpus), "--out", str(out)]
    args[args.index("--stages") + 1] = "5"
    # The model is checked before the launch shape, so one process is enough to see this error.
    check_refused(run_pretrain(args, None, cache_dir), out, "4 decoder layers, which cannot be cut into 5 stages")


def test_world_size_not_a_multiple_of_stages(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    args = BASE + ["--data", str(text_corpus), "--out", str(out)]
    args[args.index("--stages") + 1] = "2"
    check_refused(run_pretrain(args, None, cache_dir), out, "1 ranks cannot be split into 2 pipeline stages")


def test_batch_sizes_that_do_not_divide(tmp_path, cache_dir, text_corpus, repo):
    cfg = json.loads((repo / "ds_configs/test-1m.json").read_text())
    cfg.pop("gradient_accumulation_steps")
    cfg["train_batch_size"] = 5
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = BASE + ["--data", str(text_corpus), "--out", str(out)]
    args[args.index("ds_configs/test-1m.json")] = str(ds_path)
    check_refused(run_pretrain(args, None, cache_dir), out, "train_batch_size 5 is not divisible")


def test_resume_without_a_checkpoint(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    result = run_pretrain(BASE + ["--data", str(text_corpus), "--out", str(out), "--resume"], None, cache_dir)
    check_refused(result, out, "holds no complete checkpoint")


def test_a_run_dir_that_cannot_be_written(tmp_path, cache_dir, text_corpus):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root ignores permission bits; a file in the path cannot be bypassed
    out = blocker / "run"
    result = run_pretrain(BASE + ["--data", str(text_corpus), "--out", str(out)], None, cache_dir)
    check_refused(result, out, "cannot write to the run dir", str(out))


def test_a_full_disk_is_found_before_training(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from bll_ds.infra.errors import UserError
    from bll_ds.infra.storage import check_run_dir_storage

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(UserError, match=r"has 0.00 GB free; 3 checkpoints of this 25.0M-parameter model need about"):
        check_run_dir_storage(tmp_path / "run", 25_000_000, keep_checkpoints=2)
    assert not (tmp_path / "run").exists()
    check_run_dir_storage(tmp_path / "run", 1_000, keep_checkpoints=2)  # a small model fits


def test_every_rank_checks_the_run_dir_at_once(tmp_path):
    """All ranks probe before the process group exists. An earlier version created and removed
    the run dir, so one rank's clean-up broke another rank's probe (seen in CI with 4 ranks)."""
    from concurrent.futures import ThreadPoolExecutor

    from bll_ds.infra.storage import check_run_dir_storage

    out = tmp_path / "runs" / "new-run"
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            list(pool.map(lambda _: check_run_dir_storage(out, 1_000, keep_checkpoints=2), range(8)))
    assert not out.exists() and sorted(tmp_path.iterdir()) == []  # nothing created, nothing left behind
