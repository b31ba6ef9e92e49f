"""Resume on another number of data-parallel replicas (bll_ds/run/checkpoint.py check_compatible):
with the global batch unchanged, a run saved on 2 replicas per stage continues on 1, and one saved
on 1 continues on 2, on the per-step losses of an uninterrupted run. The DeepSpeed config fixes
train_batch_size and gradient_accumulation_steps, so the micro-batch size follows the replica
count, as it would for a user who lost a node."""

import json

import pytest

from helpers import launch_failure, read_metrics, run_pretrain

pytestmark = pytest.mark.launcher  # five launches of 2 and 4 ranks, about 30 s

ARGS = ["--model", "models/test-1m.json", "--tokenizer", "char", "--seq_len", "32", "--stages", "2", "--steps", "8",
        "--save_interval", "4", "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2",
        "--no-measure_matmul_peak"]


def _losses(run_dir):
    return {m["step"]: m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m}


def test_a_run_moves_between_replica_counts_on_the_uninterrupted_curve(tmp_path, cache_dir, text_corpus, repo):
    config = json.loads((repo / "ds_configs" / "test-1m.json").read_text())
    config.pop("train_micro_batch_size_per_gpu")
    config["train_batch_size"] = 8  # 2 micro-batches x 4 sequences, over however many replicas
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config))
    base = ARGS + ["--deepspeed_config", str(ds), "--data", str(text_corpus)]

    def launch(out, ranks, port, *extra):
        result = run_pretrain(base + ["--out", str(out), *extra], ranks, cache_dir, master_port=port)
        assert result.returncode == 0, launch_failure(result)

    launch(tmp_path / "straight", 4, 29643)
    launch(tmp_path / "two-to-one", 4, 29644, "--exit_interval", "4")
    launch(tmp_path / "two-to-one", 2, 29645, "--resume")
    launch(tmp_path / "one-to-two", 2, 29646, "--exit_interval", "4")
    launch(tmp_path / "one-to-two", 4, 29647, "--resume")
    straight = _losses(tmp_path / "straight")
    assert sorted(straight) == list(range(1, 9))
    for moved in ("two-to-one", "one-to-two"):
        losses = _losses(tmp_path / moved)
        assert sorted(losses) == sorted(straight)
        assert all(losses[s] == pytest.approx(straight[s], rel=1e-5) for s in straight), (moved, losses, straight)
