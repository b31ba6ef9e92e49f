"""End-to-end runs through the deepspeed launcher: 2 CPU ranks = 2 pipeline stages (4 ranks for
2 stages x 2 replicas). These are the slowest tests; each launch costs ~10 s of start-up."""

import json
import shutil

import pytest
import torch

from helpers import read_metrics, run_pretrain, train_losses

pytestmark = pytest.mark.launcher

COMMON = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
          "--method", "bp", "--tokenizer", "char", "--seq_len", "64", "--log_interval", "1",
          "--eval_interval", "10", "--eval_batches", "4", "--final_eval_batches", "16", "--seed", "7"]


def launch(args, ranks, cache_dir, port):
    result = run_pretrain(COMMON + args, ranks, cache_dir, master_port=port)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir, text_corpus):
    """30 uninterrupted steps on 2 stages, checkpoint every 10."""
    out = tmp_path_factory.mktemp("straight") / "run"
    launch(["--data", str(text_corpus), "--stages", "2", "--steps", "30", "--save_interval", "10",
            "--out", str(out)], 2, cache_dir, 29611)
    return out


def test_two_stage_run_learns_and_reports(straight_run):
    losses = train_losses(straight_run)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)  # char-level loss starts near ln(68) = 4.2
    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["method"] == "bp" and summary["stages"] == 2 and summary["dp"] == 1
    assert summary["tokens_seen"] == 30 * 2 * 2 * 64
    assert 0 < summary["val_loss"] < first
    assert summary["tokens_per_s"] > 0 and summary["wall_s"] > summary["train_wall_s"] > 0
    s0, s1 = summary["stages_detail"]
    # 1F1B: activations flow down, gradients flow up, one of each per micro-batch per step.
    assert (s0["acts_sent"], s0["grads_received"], s0["grads_sent"]) == (60, 60, 0)
    assert (s1["acts_received"], s1["grads_sent"], s1["acts_sent"]) == (60, 60, 0)
    assert s0["bytes_down"] == s1["bytes_up"] == 60 * 2 * 64 * 128 * 4  # fp32 [2, 64, 128] per micro-batch
    for stage in (s0, s1):
        assert stage["busy_s"] > 0 and stage["idle_s"] > 0 and stage["peak_rss_mb"] > 0
    assert (straight_run / "tokenizer.model").is_file()
    assert list((straight_run / "tb").glob("events.out.tfevents.*"))
    assert (straight_run / "checkpoints" / "latest").read_text() == "step_0000030"
    kept = sorted(p.name for p in (straight_run / "checkpoints").glob("step_*"))
    assert kept == ["step_0000020", "step_0000030"]  # keep_checkpoints=2


def test_resume_continues_exactly(straight_run, tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    base = ["--data", str(text_corpus), "--stages", "2", "--steps", "30", "--save_interval", "10", "--out", str(out)]
    launch(base + ["--exit_interval", "20"], 2, cache_dir, 29612)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000020"
    assert max(train_losses(out)) == 20
    launch(base + ["--resume"], 2, cache_dir, 29613)
    resumed, straight = train_losses(out), train_losses(straight_run)
    assert sorted(resumed) == list(range(1, 31))
    # Same data position, optimizer, scheduler and weights: the loss curve is the same curve.
    for step in range(21, 31):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-6), step
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, straight_run)]
    assert summaries[0]["resumed_from_step"] == 20
    assert summaries[0]["val_loss"] == pytest.approx(summaries[1]["val_loss"], rel=1e-6)


def test_resume_refuses_a_corrupt_checkpoint(straight_run, tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    layer_file = sorted((out / "checkpoints" / "step_0000030").glob("layer_*-model_states.pt"))[0]
    layer_file.write_bytes(b"not a torch file")
    result = run_pretrain(COMMON + ["--data", str(text_corpus), "--stages", "2", "--steps", "40",
                                    "--out", str(out), "--resume"], 2, cache_dir, master_port=29614)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "Fix:" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_resume_refuses_a_different_launch_shape(straight_run, tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    result = run_pretrain(COMMON[:-1] + ["8", "--data", str(text_corpus), "--stages", "2", "--steps", "40",
                                         "--out", str(out), "--resume"], 2, cache_dir, master_port=29615)
    errors = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert result.returncode != 0 and len(errors) == 1 and "seed=7" in errors[0], result.stderr[-2000:]


def test_two_stages_by_two_replicas(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    launch(["--data", str(text_corpus), "--stages", "2", "--steps", "6", "--out", str(out)], 4, cache_dir, 29616)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"] == 2 and summary["tokens_seen"] == 6 * 2 * 2 * 2 * 64
    assert [s["stage"] for s in summary["stages_detail"]] == [0, 1]
    # Both replicas of a stage hold bit-identical weights after the data-parallel all-reduce.
    assert all(s["replicas_identical"] for s in summary["stages_detail"])
    states = sorted((out / "checkpoints" / "step_0000006").glob("layer_*-model_states.pt"))
    assert len(states) == 6  # embedding + 4 decoder layers + head, saved once per layer
    assert read_metrics(out)[-1]["val/loss"] > 0
