"""Peer arms (bll_bench/peer_pipeline.py): torch.distributed.pipelining's Schedule1F1B,
ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble and
ScheduleDualPipeV, on 2 CPU/gloo ranks, each do one optimizer step on the same 4 fixed
micro-batches; every rank's parameters (and the pre-clip gradients) must equal those of plain
single-process autograd on build_sequential with the mean loss over the micro-batches, the same
global-norm clipping and the same AdamW step.

One torchrun launch runs all five schedules in turn (one start-up instead of five); the
comparisons are per schedule. The tests that read a torchrun launch carry the launcher marker."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from helpers import REPO, VENV_BIN, cpu_env

from bll_bench.peer_pipeline import PEER_SCHEDULES, fixed_batches, rank_stages, reference_step
from bll_ds.modeling import load_model_spec
from bll_ds.modeling.layers import lm_loss
from bll_ds.modeling.pipeline import build_sequential, layer_specs, stage_layer_ranges

MASTER_PORT = 29807
WORLD, MICRO_BATCHES, SEQ_LEN, SEED, VOCAB = 2, 4, 16, 0, 64
# test-1m's optimizer and clipping; clip 0.5 is below this step's gradient norm (~2.95), so the
# clip is exercised. No LR scheduler here: DeepSpeed's WarmupCosineLR gives lr = 0 on the first
# step (its get_lr before the first scheduler.step()), which would leave the weights unmoved and
# the comparison empty; build_scheduler builds the same object for both sides anyway.
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": MICRO_BATCHES,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                               "weight_decay": 0.1, "torch_adam": True}},
    "gradient_clipping": 0.5,
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 0},
}


@pytest.fixture(scope="module")
def config():
    return load_model_spec(REPO / "models/test-1m.json", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def reference_batches():
    return fixed_batches(VOCAB, SEQ_LEN, DS_CONFIG["train_micro_batch_size_per_gpu"], MICRO_BATCHES, SEED)


@pytest.fixture(scope="module")
def reference(config, reference_batches):
    return reference_step(config, DS_CONFIG, SEED, reference_batches)


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("peer")
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(WORLD), "--master_port", str(MASTER_PORT),
           "-m", "bll_bench.peer_pipeline", "--model", str(REPO / "models/test-1m.json"),
           "--vocab_size", str(VOCAB), "--ds_config", json.dumps(DS_CONFIG),
           "--schedules", ",".join(PEER_SCHEDULES), "--micro_batches", str(MICRO_BATCHES),
           "--seq_len", str(SEQ_LEN), "--seed", str(SEED), "--timeout_s", "30", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def test_stage_placement_matches_torch():
    from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping

    for world in (2, 3, 4):
        for spec in PEER_SCHEDULES.values():
            stages = world * spec.stages_per_rank
            expected = generate_rank_to_stage_mapping(world, stages, style=spec.placement)
            assert {r: rank_stages(spec, r, world) for r in range(world)} == expected, spec.name
    v = PEER_SCHEDULES["zbv"]
    assert [rank_stages(v, r, 2) for r in range(2)] == [[0, 3], [1, 2]]


def test_stage_layer_ranges_cover_the_model(config):
    total = len(layer_specs(config))  # embedding, 4 decoder layers, head
    for stages in (1, 2, 4):
        ranges = stage_layer_ranges(config, stages)
        assert [i for r in ranges for i in r] == list(range(total))
        assert all(len(r) for r in ranges)
    assert stage_layer_ranges(config, 2) == [range(0, 3), range(3, 6)]
    assert stage_layer_ranges(config, 4) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]


@pytest.mark.launcher
@pytest.mark.parametrize("name", list(PEER_SCHEDULES))
def test_peer_arm_one_step_matches_autograd(name, peer_runs, reference, reference_batches, config):
    folder = peer_runs / name
    error = folder / "error.txt"
    assert not error.exists(), f"{PEER_SCHEDULES[name].class_name} failed on CPU/gloo: {error.read_text()}"
    params, grads, stages, losses, eval_losses = {}, {}, [], [], []
    for rank in range(WORLD):
        saved = torch.load(folder / f"rank{rank}.pt")
        eval_losses.append(saved["eval_loss"])
        assert not set(saved["params"]) & set(params), "a parameter on two ranks"
        params.update(saved["params"])
        grads.update(saved["grads"])
        stages += saved["stages"]
        assert saved["norm"] == pytest.approx(reference["norm"], rel=1e-5)  # one global norm on every rank
        if saved["loss"] is not None:
            losses.append(saved["loss"])
    spec = PEER_SCHEDULES[name]
    assert sorted(stages) == list(range(WORLD * spec.stages_per_rank))
    assert losses == [pytest.approx(reference["loss"], rel=1e-6)]  # the mean over micro-batches, once
    assert set(params) == set(reference["params"])
    initial = dict(build_sequential(config, SEED).named_parameters())
    for key, value in reference["params"].items():
        assert not torch.equal(value, initial[key].detach()), f"{key} did not move: the check would be empty"
        torch.testing.assert_close(params[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
    # The evaluation walk (every rank gets the loss) equals the stepped model's plain forward.
    stepped = build_sequential(config, SEED)
    stepped.load_state_dict(reference["params"])
    with torch.no_grad():
        expected = torch.stack([lm_loss(stepped(x), y) for x, y in reference_batches]).mean()
    assert eval_losses == [pytest.approx(float(expected), rel=1e-5)] * WORLD
    # Adam's first step is nearly sign(grad): check the gradients themselves too (before clipping).
    assert set(grads) == set(reference["grads"])
    for key, value in reference["grads"].items():
        torch.testing.assert_close(grads[key], value, rtol=1e-4, atol=1e-6 * float(value.abs().max()),
                                   msg=lambda m: f"{name} grad {key}: {m}")


@pytest.mark.launcher
def test_peer_pretrain_script_trains_and_writes_what_the_harness_reads(tmp_path, text_corpus, cache_dir):
    """scripts/peer_pretrain.py: the launchable arm, on the run data pretrain.py builds (3 steps of
    DualPipeV, which needs micro-batches >= stages = 4), through a 20 ms slow link
    (bll_ds/pipeline/launched/link_delay.py on torch's P2POp path); its outputs are what the bench harness reads."""
    from bll_bench import compare

    (tmp_path / "ds.json").write_text(json.dumps(DS_CONFIG))
    out = tmp_path / "run"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(WORLD), "--master_port", str(MASTER_PORT + 1),
           str(REPO / "scripts/peer_pretrain.py"), "--schedule", "dualpipev",
           "--model", str(REPO / "models/test-1m.json"), "--deepspeed_config", str(tmp_path / "ds.json"),
           "--data", str(text_corpus), "--tokenizer", "char", "--cache_dir", str(cache_dir),
           "--steps", "3", "--seq_len", str(SEQ_LEN), "--log_interval", "1", "--eval_interval", "2",
           "--eval_batches", "3", "--final_eval_batches", "3", "--throughput_warmup_steps", "1",
           "--link_delay_ms", "20", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert "3/3 [" in result.stderr  # the progress bar moved to the last step
    assert all(0 < r["train/loss"] < 10 and r["train/grad_norm"] > 0 and r["train/lr"] == 3e-3 for r in train)
    assert [r["step"] for r in rows if "val/loss" in r] == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["torch_class"] == "ScheduleDualPipeV" and summary["pipeline_stages"] == 2 * WORLD
    assert summary["stages"] == WORLD and summary["link_delay_ms"] == 20
    got = compare.read_run(out, warmup_steps=1, target_loss=10.0)
    assert got["val_loss"] == summary["val_loss"] and got["target_step"] == 2
    assert [step for step, _ in got["train_s_at_step"]] == [1, 2, 3]
    assert [stage["pipeline_stages"] for stage in summary["stages_detail"]] == [[0, 3], [1, 2]]
