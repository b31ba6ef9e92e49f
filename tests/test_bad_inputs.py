"""Every bad input a user can type, as a table: pretrain, generate, evaluate and export each answer
with exit code 2, one line that names the problem (`error:`), no traceback, and, where a run was
refused, the run dir as it was (byte for byte) or not there at all. One process per case, forked
from the test fork server; nothing here launches ranks."""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from bll_ds.run.run_dir import WRITER_LOCK
from helpers import REPO, launch_failure, run_script

SCRIPTS = REPO / "scripts"
TINY = ["--model", "models/test-1m.json", "--emulate", "--tokenizer", "char", "--seq_len", "32", "--stages", "2",
        "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2", "--no-measure_matmul_peak",
        "--no-progress", "--steps", "4", "--save_interval", "2"]
DS = ["--deepspeed_config", "ds_configs/test-1m.json"]


def _ds_config(folder: Path, name: str, edit) -> str:
    config = json.loads((REPO / "ds_configs" / "test-1m.json").read_text())
    edit(config)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return str(path)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache_dir, text_corpus):
    """A finished 4-step emulated run (checkpoints at 2 and 4) that the resume cases are refused on."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    run_dir = folder / "base"
    result = run_script(SCRIPTS / "pretrain.py", TINY + DS + ["--data", str(text_corpus), "--cache_dir",
                                                              str(cache_dir), "--out", str(run_dir)])
    assert result.returncode == 0, launch_failure(result)
    configs = {
        "misspelt": _ds_config(folder, "misspelt", lambda c: c.update(gradient_cliping=c.pop("gradient_clipping"))),
        "negative_lr": _ds_config(folder, "negative_lr", lambda c: c["optimizer"]["params"].update(lr=-1e-3)),
        "scheduler_key": _ds_config(folder, "scheduler_key",
                                    lambda c: c["scheduler"]["params"].update(warmup_num_step=3)),
        "optimizer_key": _ds_config(folder, "optimizer_key",
                                    lambda c: c["optimizer"]["params"].update(weight_decai=0.1)),
        "batch_mismatch": _ds_config(folder, "batch_mismatch", lambda c: c.update(train_batch_size=7)),
        "micro_batch_4": _ds_config(folder, "micro_batch_4", lambda c: c.update(train_micro_batch_size_per_gpu=4)),
        "zero3": _ds_config(folder, "zero3", lambda c: c["zero_optimization"].update(stage=3)),
        "clipping_negative": _ds_config(folder, "clipping_negative", lambda c: c.update(gradient_clipping=-1)),
        "betas": _ds_config(folder, "betas", lambda c: c["optimizer"]["params"].update(betas=[0.9])),
    }
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(50)))
    (folder / "not_json.json").write_text("{ not json")
    configs["not_json"] = str(folder / "not_json.json")
    no_tokenizer = folder / "no_tokenizer"
    shutil.copytree(run_dir, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    exported = folder / "exported"
    exported.mkdir()
    return {"run": run_dir, "folder": folder, "ds": configs, "no_tokenizer": no_tokenizer, "exists": exported,
            "corpus": str(text_corpus), "cache": str(cache_dir), "jsonl": str(folder / "docs.jsonl")}


# (case id, script, argument builder, phrase the error line must hold, what the case touches:
#  "new" = a fresh --out that must not exist afterwards, "run" = the base run, unchanged, None = no run dir)
def _new(b, *args, ds=DS):
    return TINY + ds + ["--data", b["corpus"], "--cache_dir", b["cache"], "--out", str(b["folder"] / "new")] + list(args)


def _resume(b, *args, ds=DS):
    base_args = TINY + ds + ["--data", b["corpus"], "--cache_dir", b["cache"], "--out", str(b["run"]), "--resume"]
    for flag, value in zip(args[::2], args[1::2]):  # a changed flag replaces the base run's
        if flag in base_args:
            base_args[base_args.index(flag) + 1] = value
        else:
            base_args += [flag, value]
    return base_args


def _ds(b, name):
    return ["--deepspeed_config", b["ds"][name]]


# Counts, intervals and sizes below their least value: refused before anything is made.
RANGES = [("--log_interval", "0"), ("--seq_len", "0"), ("--save_interval", "-1"), ("--stages", "0"),
          ("--steps", "0"), ("--eval_interval", "-5"), ("--eval_batches", "0"), ("--keep_checkpoints", "-1"),
          ("--bll_steps_per_call", "0"), ("--tokenize_workers", "0"), ("--max_consecutive_skips", "-1"),
          ("--bll_readout_max_logits_mb", "-1"), ("--exit_duration_mins", "-1"), ("--link_delay_ms", "-1")]

CASES = [(f"range{flag}", "pretrain", lambda b, flag=flag, value=value: _new(b, flag, value),
          f"{flag} {value} is out of range", "new") for flag, value in RANGES] + [
    ("hyphen-alias-checked", "pretrain", lambda b: _new(b, "--on-nonfinite", "banana"), "invalid choice: 'banana'", "new"),
    ("hyphen-variant-checked", "pretrain", lambda b: _new(b, "--bll-variant", "nope"), "unknown BLL variant 'nope'",
     "new"),
    ("hyphen-seq-len-checked", "pretrain", lambda b: _new(b, "--seq-len", "0"), "--seq_len 0 is out of range", "new"),
    ("option-not-taken", "pretrain", lambda b: _new(b, "--bll_variant", "critic-context-man:dim=4"),
     "does not take the option", "new"),
    ("method-unknown", "pretrain", lambda b: _new(b, "--method", "sgd"), "invalid choice: 'sgd'", "new"),
    ("not-a-number", "pretrain", lambda b: _new(b, "--steps", "ten"), "invalid int value: 'ten'", "new"),
    # files and shapes
    ("model-missing", "pretrain", lambda b: _new(b, "--model", "/nonexistent/model.json"),
     "model spec /nonexistent/model.json does not exist", "new"),
    ("ds-config-missing", "pretrain", lambda b: _new(b, ds=["--deepspeed_config", "/nonexistent/ds.json"]),
     "does not exist", "new"),
    ("ds-config-not-json", "pretrain", lambda b: _new(b, ds=_ds(b, "not_json")), "is not valid JSON", "new"),
    ("ds-key-misspelt", "pretrain", lambda b: _new(b, ds=_ds(b, "misspelt")), "did you mean 'gradient_clipping'",
     "new"),
    ("ds-lr-negative", "pretrain", lambda b: _new(b, ds=_ds(b, "negative_lr")), "optimizer.params.lr = -0.001", "new"),
    ("ds-scheduler-key", "pretrain", lambda b: _new(b, ds=_ds(b, "scheduler_key")), "did you mean 'warmup_num_steps'",
     "new"),
    ("ds-optimizer-key", "pretrain", lambda b: _new(b, ds=_ds(b, "optimizer_key")), "did you mean 'weight_decay'",
     "new"),
    ("ds-batch-mismatch", "pretrain", lambda b: _new(b, ds=_ds(b, "batch_mismatch")), "train_batch_size 7 !=", "new"),
    ("ds-zero-3", "pretrain", lambda b: _new(b, ds=_ds(b, "zero3")), "ZeRO stage 3", "new"),
    ("ds-clipping-negative", "pretrain", lambda b: _new(b, ds=_ds(b, "clipping_negative")), "gradient_clipping = -1",
     "new"),
    ("ds-betas", "pretrain", lambda b: _new(b, ds=_ds(b, "betas")), "betas = [0.9]", "new"),
    ("tokenizer-spec", "pretrain", lambda b: _new(b, "--tokenizer", "foo:12"), "foo:12", "new"),
    ("data-missing", "pretrain", lambda b: _new(b, "--data", "/nonexistent.txt"), "/nonexistent.txt does not exist",
     "new"),
    ("stages-above-layers", "pretrain", lambda b: _new(b, "--stages", "5"), "cannot be cut into 5 stages", "new"),
    ("seq-len-above-context", "pretrain", lambda b: _new(b, "--seq_len", "1000"), "does not fit the model's context",
     "new"),
    ("link-delay-emulated", "pretrain", lambda b: _new(b, "--link_delay_ms", "5"), "the emulator has none", "new"),
    ("resume-nothing", "pretrain", lambda b: _new(b, "--resume"), "holds no complete checkpoint", "new"),
    ("cache-dir-unwritable", "pretrain", lambda b: _new(b, "--cache_dir", "/proc/bll-ds-cache"),
     "cannot write to the cache dir", "new"),
    ("model-spec-as-ds-config", "pretrain", lambda b: _new(b, ds=["--deepspeed_config", "models/test-1m.json"]),
     "is a model spec", "new"),
    ("init-from-missing", "pretrain", lambda b: _new(b, "--init_from", "/nonexistent/run"),
     "--init_from /nonexistent/run does not exist", "new"),
    ("tokenizer-too-small", "pretrain", lambda b: _new(b, "--tokenizer", "bpe:0"), "a vocabulary of 0 cannot hold",
     "new"),
    ("text-field-missing", "pretrain", lambda b: _new(b, "--data", b["jsonl"], "--text_field", "body"),
     'has no "body" field', "new"),
    ("custom-import-missing", "pretrain", lambda b: _new(b, "--custom_import", "/nonexistent.py"),
     "no such file /nonexistent.py", "new"),
    # refusals on an existing run: the run dir stays as it was
    ("new-run-into-a-run", "pretrain", lambda b: _resume(b)[:-1], "already holds a run with checkpoints", "run"),
    ("resume-with-init-from", "pretrain", lambda b: _resume(b, "--init_from", str(b["run"])),
     "drop --init_from when resuming", "run"),
    ("resume-other-model", "pretrain", lambda b: _resume(b, "--model", "models/nanogpt-char.json"),
     "the model spec differs", "run"),
    ("resume-other-stages", "pretrain", lambda b: _resume(b, "--stages", "4"), "--stages 2 to continue the run",
     "run"),
    ("resume-other-steps", "pretrain", lambda b: _resume(b, "--steps", "8"), "pass --steps 4", "run"),
    ("resume-other-seed", "pretrain", lambda b: _resume(b, "--seed", "5"), "--seed 1234 to continue", "run"),
    ("resume-other-variant", "pretrain", lambda b: _resume(b, "--bll_variant", "dgl"), "the BLL variant differs",
     "run"),
    ("resume-other-method", "pretrain", lambda b: _resume(b, "--method", "bp"), "the method differs", "run"),
    ("resume-other-micro-batch", "pretrain", lambda b: _resume(b, ds=_ds(b, "micro_batch_4")),
     "train_micro_batch_size_per_gpu to 2", "run"),
    ("resume-other-tokenizer", "pretrain", lambda b: _resume(b, "--tokenizer", "bpe:512"),
     "already holds a tokenizer built from spec 'char'", "run"),
    ("locked-by-a-live-run", "pretrain", lambda b: _resume(b), "is being written by another run", "locked"),
    # generate, evaluate, export
    ("generate-no-new-tokens", "generate", lambda b: [str(b["run"]), "--max_new_tokens", "0"],
     "--max_new_tokens: 0 is below 1", None),
    ("generate-no-folder", "generate", lambda b: [str(b["folder"] / "nothere")], "is not a folder", None),
    ("generate-no-tokenizer", "generate", lambda b: [str(b["no_tokenizer"])], "holds no tokenizer", None),
    ("generate-no-such-step", "generate", lambda b: [str(b["run"]), "--step", "3"], "no complete checkpoint for step 3",
     None),
    ("generate-negative-top-k", "generate", lambda b: [str(b["run"]), "--top_k", "-1"], "--top_k: -1 is below 0", None),
    ("evaluate-negative-batches", "evaluate", lambda b: [str(b["run"]), "--batches", "-3"], "--batches: -3 is below 0",
     None),
    ("evaluate-no-folder", "evaluate", lambda b: [str(b["folder"] / "nothere")], "is not a bll-ds run dir", None),
    ("evaluate-no-such-step", "evaluate", lambda b: [str(b["run"]), "--step", "999"],
     "no complete checkpoint for step 999", None),
    ("evaluate-no-tokenizer", "evaluate", lambda b: [str(b["no_tokenizer"])], "holds no tokenizer", None),
    ("export-over-a-folder", "export", lambda b: [str(b["run"]), str(b["exists"])], "already exists", None),
    ("export-no-run", "export", lambda b: [str(b["folder"] / "nothere"), str(b["folder"] / "e1")],
     "is not a bll-ds run dir", None),
    ("export-negative-step", "export", lambda b: [str(b["run"]), str(b["folder"] / "e2"), "--step", "-1"],
     "--step: -1 is below 0", None),
    ("export-no-tokenizer", "export", lambda b: [str(b["no_tokenizer"]), str(b["folder"] / "e3")], "holds no tokenizer",
     None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_gets_one_line_and_touches_nothing(base, case):
    _, script, build, phrase, touches = case
    run_dir, before, lock = base["run"], _snapshot(base["run"]), None
    if touches == "locked":  # a live holder: this test's own process
        lock = run_dir / WRITER_LOCK
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "a minute ago"}))
    try:
        result = run_script(SCRIPTS / f"{script}.py", build(base))
    finally:
        if lock is not None:
            lock.unlink()
    output = result.stdout + result.stderr
    assert result.returncode == 2, launch_failure(result)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert phrase in errors[0], errors[0]
    assert "Traceback" not in output, output[-3000:]
    if touches in ("run", "locked"):
        assert _snapshot(run_dir) == before
    if script == "pretrain":
        assert not (base["folder"] / "new").exists()
    for name in ("e1", "e2", "e3"):
        assert not (base["folder"] / name).exists()
