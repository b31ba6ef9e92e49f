"""A resumed run trains with the DeepSpeed config it is launched with (bll_ds/run/resumed_settings.py):
a learning rate and weight decay changed in the config take effect from the first resumed step,
emulated and launched, and the non-finite stop's advice, followed, leads to a finished run."""

import json

import pytest

from bll_ds.pipeline.nonfinite import INJECT_ENV
from helpers import REPO, launch_failure, read_metrics, run_pretrain

ARGS = ["--model", "models/test-1m.json", "--tokenizer", "char", "--seq_len", "32", "--stages", "2",
        "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2", "--no-measure_matmul_peak",
        "--steps", "8", "--save_interval", "2"]


def _config(tmp_path, name, **params):
    config = json.loads((REPO / "ds_configs" / "test-1m.json").read_text())
    config["optimizer"]["params"].update(params)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _update_norms(run_dir, step):
    return [line["stage/update_norm"] for stage in (0, 1)
            for line in read_metrics_stage(run_dir, stage) if line.get("step") == step and "stage/update_norm" in line]


def read_metrics_stage(run_dir, stage):
    return [json.loads(line) for line in (run_dir / f"metrics_stage{stage}.jsonl").read_text().splitlines()]


def _stop_and_resume(tmp_path, cache_dir, text_corpus, ranks, resumed_config, port=None):
    run_dir = tmp_path / "run"
    args = ARGS + ["--data", str(text_corpus), "--out", str(run_dir)] + ([] if ranks else ["--emulate"])
    first = run_pretrain(args + ["--deepspeed_config", "ds_configs/test-1m.json", "--exit_interval", "4"], ranks,
                         cache_dir, master_port=port)
    assert first.returncode == 0, launch_failure(first)
    resumed = run_pretrain(args + ["--deepspeed_config", resumed_config, "--resume"], ranks, cache_dir,
                           master_port=port)
    assert resumed.returncode == 0, launch_failure(resumed)
    return run_dir


def test_a_learning_rate_lowered_in_the_config_takes_effect_from_the_first_resumed_step(tmp_path, cache_dir,
                                                                                         text_corpus):
    tiny = _config(tmp_path, "tiny", lr=1e-12, weight_decay=0.0)
    run_dir = _stop_and_resume(tmp_path, cache_dir, text_corpus, None, tiny)
    norms = _update_norms(run_dir, 5)
    assert len(norms) == 2 and max(norms) < 1e-9, norms  # at the checkpoint's lr (1.8e-3) it moves ~0.2
    same = _stop_and_resume(tmp_path / "same", cache_dir, text_corpus, None, "ds_configs/test-1m.json")
    assert min(_update_norms(same, 5)) > 1e-3  # the same resume with the saved config moves the weights


@pytest.mark.launcher
def test_the_same_through_the_launcher(tmp_path, cache_dir, text_corpus):
    tiny = _config(tmp_path, "tiny", lr=1e-12, weight_decay=0.0)
    run_dir = _stop_and_resume(tmp_path, cache_dir, text_corpus, 2, tiny, port=29618)
    norms = _update_norms(run_dir, 5)
    assert len(norms) == 2 and max(norms) < 1e-9, norms


def test_the_non_finite_stops_advice_followed_finishes_the_run(tmp_path, cache_dir, text_corpus):
    """A loss spike at step 3 stops the run; its message names the checkpoint, the config and the
    setting to lower. Resumed as it says (the spike was a transient: gone on the second try), the
    run ends, and the resumed steps ran at the lowered rate."""
    run_dir = tmp_path / "run"
    args = ARGS + ["--emulate", "--data", str(text_corpus), "--out", str(run_dir)]
    stopped = run_pretrain(args + ["--deepspeed_config", "ds_configs/test-1m.json"], None, cache_dir,
                           env={INJECT_ENV: "3:1:loss"})
    assert stopped.returncode == 2
    (line,) = [line for line in stopped.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert "the training loss is non-finite" in line and "at step 3 on stage 1" in line
    assert ("resume (--resume) from the last good checkpoint, step_0000002, after lowering optimizer.params.lr "
            "(or gradient_clipping) in ds_configs/test-1m.json" in line), line
    lowered = _config(tmp_path, "lowered", lr=1e-4)
    resumed = run_pretrain(args + ["--deepspeed_config", lowered, "--resume"], None, cache_dir)
    assert resumed.returncode == 0 and "done: val_loss=" in resumed.stdout, launch_failure(resumed)
    lrs = {m["step"]: m["train/lr"] for m in read_metrics(run_dir) if "train/lr" in m}
    assert sorted(lrs) == list(range(1, 9)) and max(lrs[s] for s in range(3, 9)) <= 1e-4 < lrs[2]
