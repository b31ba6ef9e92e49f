"""End-to-end runs through the deepspeed launcher: 2 CPU ranks = 2 pipeline stages (4 ranks for
2 stages x 2 replicas). These are the slowest tests; each launch costs ~10 s of start-up."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bll_ds.data import Tokenizer
from helpers import LAUNCH_COMMON, launch_failure, read_metrics, run_pretrain, train_losses

pytestmark = pytest.mark.launcher

COMMON = LAUNCH_COMMON  # the settings of conftest's launched_bp_run and launched_bll_run, resumed below


def launch(args, ranks, cache_dir, port):
    result = run_pretrain(COMMON + args, ranks, cache_dir, master_port=port)
    assert result.returncode == 0, launch_failure(result)
    return result


@pytest.fixture
def straight_run(launched_bp_run):
    """30 uninterrupted backprop steps on 2 stages, checkpoint every 10 (conftest, shared)."""
    return launched_bp_run


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


def stopped_at(run: Path, out: Path, step: int) -> Path:
    """`run` as it was when it stopped after `step` (a checkpoint step): later checkpoints,
    metrics lines and the summary gone. The stop itself (--exit_interval, a signal, a killed rank)
    is tested where it happens: tests/test_emulator.py, test_job_control.py, test_reliability.py."""
    shutil.copytree(run, out)
    tag = f"step_{step:07d}"
    for folder in (out / "checkpoints").glob("step_*"):
        if folder.name > tag:
            shutil.rmtree(folder)
    (out / "checkpoints" / "latest").write_text(tag)
    for metrics in out.glob("metrics*.jsonl"):
        lines = metrics.read_text().splitlines()
        metrics.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    (out / "summary.json").unlink()
    return out


def test_resume_continues_exactly(straight_run, tmp_path, cache_dir, text_corpus):
    out = stopped_at(straight_run, tmp_path / "run", 20)
    base = ["--data", str(text_corpus), "--stages", "2", "--steps", "30", "--save_interval", "10", "--out", str(out)]
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
    result = run_pretrain(COMMON + ["--data", str(text_corpus), "--stages", "2", "--steps", "30",
                                    "--out", str(out), "--resume"], 2, cache_dir, master_port=29614)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "Fix:" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# make test-all only: it repeats tests/test_checkpoint.py::test_a_different_launch_is_refused[seed-2]
# through a launch; a launched resume's one-line refusal is covered above (a corrupt checkpoint), and
# the launched meta check by tests/test_emulator.py (a launch refusing to resume an emulated run).
@pytest.mark.slow
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


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_one_pipeline_step_equals_a_hand_computed_adamw_step(tmp_path, cache_dir, text_corpus, zero_stage):
    """Pins DeepSpeed's pipeline backward, gradient-accumulation scaling, clipping and AdamW: the
    weights after one 2-stage 1F1B step equal one step of plain PyTorch on the same model and
    micro-batches. Breaks loudly if a DeepSpeed upgrade changes any of them.

    Adam's first step is lr * g / (|g| + eps): with a tiny eps it is sign(g) and magnifies float
    noise in near-zero gradients, so eps is large enough here for the update to track g itself
    (a wrong accumulation scale or clip shows up as a wrong update).
    """
    from bll_ds.data import Tokenizer, load_corpus, prepare_token_streams, MicroBatchSampler
    from bll_ds.modeling import build_sequential, lm_loss, load_model_spec
    from bll_ds.pipeline.build import weight_decay_groups

    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "gradient_clipping": 0.5,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1e-3,
                                                        "weight_decay": 0.1, "torch_adam": True}},
              "bf16": {"enabled": False}, "zero_optimization": {"stage": zero_stage}}
    (tmp_path / "ds.json").write_text(json.dumps(ds_cfg))
    out = tmp_path / "run"
    result = run_pretrain(["--method", "bp", "--model", "models/test-1m.json", "--deepspeed_config", str(tmp_path / "ds.json"),
                           "--stages", "2", "--tokenizer", "char", "--seq_len", "32", "--steps", "1",
                           "--data", str(text_corpus), "--final_eval_batches", "1", "--seed", "11",
                           "--out", str(out)], 2, cache_dir, master_port=29617 + zero_stage)
    assert result.returncode == 0, launch_failure(result)

    tokenizer = Tokenizer(str(out / "tokenizer.model"))
    streams = prepare_token_streams(load_corpus(str(text_corpus)), tokenizer, str(cache_dir), num_proc=1)
    config = load_model_spec("models/test-1m.json", vocab_size=tokenizer.vocab_size)
    model = build_sequential(config, seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(weight_decay_groups(model), lr=0.01, betas=(0.9, 0.95), eps=1e-3, weight_decay=0.1)
    sampler = MicroBatchSampler(streams.train, 32, 2, seed=11)
    for m in range(3):
        ids, labels = sampler.get(0, m, 3)
        (lm_loss(model(ids), labels) / 3).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    assert norm > 0.5  # the clip is active, so a wrong norm would change the update
    optimizer.step()

    moved = 0.0
    for index, layer in enumerate(model):
        saved = torch.load(out / "checkpoints" / "step_0000001" / f"layer_{index:02d}-model_states.pt",
                           map_location="cpu", weights_only=True)
        for key, expected in layer.state_dict().items():
            torch.testing.assert_close(saved[key], expected, rtol=1e-5, atol=1e-6, msg=f"layer {index} {key}")
            moved = max(moved, (expected - before[f"{index}.{key}"]).abs().max().item())
    assert moved > 1e-3  # the step really changed the weights, so the comparison has teeth


# ---- block-local learning ---------------------------------------------------------------------

@pytest.fixture
def bll_run(launched_bll_run):
    """30 block-local steps (prototype feedback) on 2 stages, checkpoint every 10, 8 steps per call
    (conftest, shared)."""
    return launched_bll_run


def test_bll_sends_no_gradients_and_learns(bll_run, straight_run):
    summary = json.loads((bll_run / "summary.json").read_text())
    assert summary["method"] == "bll" and summary["bll_variant"] == "prototype"
    s0, s1 = summary["stages_detail"]
    for stage in (s0, s1):
        assert stage["grads_sent"] == 0 and stage["grads_received"] == 0
    assert s0["acts_sent"] == s1["acts_received"] == 30 * 2
    # One feedback table per step goes upstream (plus the initial one), lagged by two steps.
    assert s1["tables_sent"] == 31 and s0["tables_received"] == 31
    vocab = Tokenizer(str(bll_run / "tokenizer.model")).vocab_size  # 68 on Tiny Shakespeare, more on the fallback
    assert s1["bytes_up"] == 31 * vocab * 128 * 4  # [vocab, hidden] fp32
    assert "ce" in s0["local_terms"] and s0["local_loss"] > 0
    losses = train_losses(bll_run)
    assert sum(losses[s] for s in (28, 29, 30)) / 3 < sum(losses[s] for s in (1, 2, 3)) / 3 - 0.5
    bp = json.loads((straight_run / "summary.json").read_text())["stages_detail"]
    assert bp[0]["grads_received"] > 0 and bp[1]["grads_sent"] > 0  # backprop does send them
    assert (bll_run / "tb" / "stage0").is_dir() and (bll_run / "metrics_stage0.jsonl").is_file()


def test_bll_resume_continues_exactly(bll_run, tmp_path, cache_dir, text_corpus):
    out = stopped_at(bll_run, tmp_path / "run", 20)
    base = ["--method", "bll", "--bll_variant", "prototype", "--data", str(text_corpus), "--stages", "2", "--steps", "30",
            "--save_interval", "10", "--bll_steps_per_call", "8", "--final_eval_batches", "0", "--out", str(out)]
    launch(base + ["--resume"], 2, cache_dir, 29623)
    resumed, straight = train_losses(out), train_losses(bll_run)
    for step in range(21, 31):
        assert resumed[step] == straight[step], step  # bit-exact: feedback state and tables restored
    stage0 = [json.loads(line) for line in (out / "metrics_stage0.jsonl").read_text().splitlines()]
    stage0_straight = [json.loads(line) for line in (bll_run / "metrics_stage0.jsonl").read_text().splitlines()]
    assert [m["stage/loss"] for m in stage0 if m["step"] > 20] == [m["stage/loss"] for m in stage0_straight if m["step"] > 20]


def perturb_last_stage(run_dir: Path, tag: str, layers: list[int]):
    for index in layers:
        path = run_dir / "checkpoints" / tag / f"layer_{index:02d}-model_states.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}, path)


@pytest.mark.parametrize("method", ["bll", "bp"])
def test_stage0_update_ignores_the_last_stage_only_in_bll(method, bll_run, straight_run, tmp_path, cache_dir, text_corpus):
    """Resume one step (21) from the same checkpoint (20) twice, once with the last stage's
    weights perturbed. Block-local: stage 0's new weights are bit-identical. Backprop: they differ.
    (The run keeps its 30-step schedule: --exit_interval 21 stops it after the one step.)"""
    source = bll_run if method == "bll" else straight_run
    extra = ["--bll_variant", "prototype", "--bll_steps_per_call", "8"] if method == "bll" else []
    stage0 = {}
    for name, port in (("plain", 29624), ("perturbed", 29625)):
        out = stopped_at(source, tmp_path / name, 20)
        if name == "perturbed":
            perturb_last_stage(out, "step_0000020", [3, 4, 5])
        launch(["--method", method, "--data", str(text_corpus), "--stages", "2", "--steps", "30",
                "--exit_interval", "21", "--out", str(out), "--resume", *extra], 2, cache_dir,
               port + (10 if method == "bp" else 0))
        stage0[name] = [torch.load(out / "checkpoints" / "step_0000021" / f"layer_{i:02d}-model_states.pt",
                                   map_location="cpu", weights_only=True) for i in (0, 1, 2)]
    same = all(torch.equal(a[k], b[k]) for a, b in zip(stage0["plain"], stage0["perturbed"]) for k in a)
    assert same == (method == "bll")


@pytest.mark.parametrize("variant", [pytest.param("gaussian", marks=pytest.mark.slow), "dgl"])  # gaussian: make test-all
def test_bll_variants_and_zero1_replicas(variant, tmp_path, cache_dir, text_corpus, repo):
    """2 stages x 2 data-parallel replicas with ZeRO-1: the replicas of each stage stay identical."""
    cfg = json.loads((repo / "ds_configs/test-1m.json").read_text())
    cfg["zero_optimization"] = {"stage": 1}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = COMMON + ["--method", "bll", "--bll_variant", variant, "--data", str(text_corpus), "--stages", "2",
                     "--steps", "8", "--bll_steps_per_call", "4", "--out", str(out)]
    args[args.index("ds_configs/test-1m.json")] = str(tmp_path / "ds.json")
    result = run_pretrain(args, 4, cache_dir, master_port=29627 + (variant == "dgl"))
    assert result.returncode == 0, launch_failure(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"] == 2 and all(s["replicas_identical"] for s in summary["stages_detail"])
    assert all(s["grads_sent"] == 0 for s in summary["stages_detail"])
    tables = summary["stages_detail"][1]["tables_sent"]
    assert tables == (9 if variant == "gaussian" else 0)  # dgl has no feedback network
    if variant == "gaussian":
        assert {"agreement", "guard_spread", "guard_decorrelation"} <= set(summary["stages_detail"][0]["local_terms"])
