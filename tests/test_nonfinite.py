"""A step with a NaN/inf loss or gradient is never applied. --on_nonfinite stop ends the run with
a message naming the step, the stage and the last good checkpoint; --on_nonfinite skip drops the
update and goes on. Block-local stages decide alone; backprop stages decide together.

Faults are injected with BLL_DS_INJECT_NONFINITE (bll_ds/pipeline/nonfinite.py), so the step and
stage are known; one test diverges for real with a huge learning rate."""

import json
import re
from pathlib import Path

import pytest
import torch

from bll_ds.infra.errors import UserError
from bll_ds.pipeline import nonfinite
from bll_ds.run.nonfinite_policy import NonFinitePolicy
from helpers import launch_failure, read_metrics, run_pretrain, train_losses

STEPS = 8
ARGS = ["--model", "models/test-1m.json", "--tokenizer", "char", "--seq_len", "64", "--stages", "2",
        "--steps", str(STEPS), "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2",
        "--save_interval", "1", "--keep_checkpoints", "20", "--seed", "5", "--bll_steps_per_call", "4",
        "--no-measure_matmul_peak"]


# ---- units ----------------------------------------------------------------------------------------
def test_fault_injection_spec():
    assert nonfinite.FaultInjection(0, spec="").step is None
    assert nonfinite.FaultInjection(1, spec="5:0").step is None  # another stage's fault
    fault = nonfinite.FaultInjection(0, replica=3, spec="5:0")  # every replica of the stage
    assert (fault.step, fault.kind) == (5, "grads")
    assert nonfinite.FaultInjection(2, spec="7:2:loss").kind == "loss"
    assert nonfinite.FaultInjection(2, replica=1, spec="7:2:loss:1").step == 7
    assert nonfinite.FaultInjection(2, replica=0, spec="7:2:loss:1").step is None  # another replica's
    for bad in ("5", "x:0", "5:0:weights", "5:0:loss:x", "5:0:loss:1:2"):
        with pytest.raises(ValueError, match="STEP:STAGE"):
            nonfinite.FaultInjection(0, spec=bad)


@pytest.mark.parametrize("kind", ["grads", "loss"])
def test_injected_kinds_poison_the_value_and_only_grads_poisons_gradients(kind):
    weight = torch.ones(3, requires_grad=True)
    loss = nonfinite.FaultInjection(0, spec=f"2:0:{kind}").apply((weight * 2).sum(), step=2)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(weight.grad).all() == (kind == "grads")
    assert torch.isfinite(weight.grad).all() == (kind == "loss")
    untouched = nonfinite.FaultInjection(0, spec=f"2:0:{kind}").apply(torch.tensor(1.5), step=3)
    assert untouched.item() == 1.5


def test_local_cause_checks_the_loss_then_the_gradients():
    assert nonfinite.local_cause([torch.tensor(1.0)], [None]) is None  # no gradient yet
    grad = torch.tensor([1.0, 2.0, float("inf"), 0.0])
    assert nonfinite.local_cause([torch.tensor(1.0)], [None, grad]) == nonfinite.GRADS
    assert nonfinite.local_cause([torch.tensor(1.0), torch.tensor(float("nan"))], [grad]) == nonfinite.LOSS
    assert nonfinite.local_cause([], [torch.zeros(4)]) is None


class _Record:
    def __init__(self, step, cause=None, loss=3.0):
        self.step, self.nonfinite, self.loss = step, cause, loss


def test_policy_stop_names_the_step_stage_and_what_to_do(tmp_path):
    policy = NonFinitePolicy("stop", 10, stage=1, run_dir=tmp_path, announce=print)
    policy.check([_Record(1), _Record(2)])
    with pytest.raises(UserError, match=r"the gradients are non-finite at step 3 on stage 1 .*not applied.*"
                                         r"start again \(the run has no complete checkpoint yet\)"):
        policy.check([_Record(3, nonfinite.GRADS)])


def test_policy_skip_counts_skips_in_a_row_and_stops_past_the_limit(tmp_path):
    lines = []
    policy = NonFinitePolicy("skip", 2, stage=0, run_dir=tmp_path, announce=lines.append)
    policy.check([_Record(1, nonfinite.LOSS, float("nan")), _Record(2, nonfinite.PEER), _Record(3)])
    policy.check([_Record(4, nonfinite.DEEPSPEED), _Record(5, nonfinite.GRADS)])  # 2 in a row: allowed
    assert [line.split("(")[-1] for line in lines] == ["1 in a row, limit 2).", "2 in a row, limit 2).",
                                                       "1 in a row, limit 2).", "2 in a row, limit 2)."]
    with pytest.raises(UserError, match=r"stage 0 skipped 3 steps in a row \(steps 4..6\): the run has diverged"):
        policy.check([_Record(6, nonfinite.GRADS)])


# ---- launched runs --------------------------------------------------------------------------------
def stage_state(run_dir: Path, step: int, layers, stage: int, zero_stage: int = 0) -> tuple[list, dict]:
    """(layer weights, optimizer moments) of one stage as checkpointed after `step`."""
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    weights = [torch.load(folder / f"layer_{i:02d}-model_states.pt", weights_only=True) for i in layers]
    if zero_stage:
        optim = torch.load(folder / f"zero_pp_rank_0_mp_rank_{stage:02d}_optim_states.pt", weights_only=False)
        state = optim["optimizer_state_dict"]["base_optimizer_state"]["state"]
    else:
        state = torch.load(folder / f"mp_rank_{stage:02d}_model_states.pt", weights_only=False)["optimizer"]["state"]
    return weights, state


def same_state(a, b) -> bool:
    same_weights = all(torch.equal(x[k], y[k]) for x, y in zip(a[0], b[0]) for k in x)
    same_moments = all(torch.equal(a[1][i][k], b[1][i][k]) for i in a[1] for k in a[1][i] if torch.is_tensor(a[1][i][k]))
    return same_weights and same_moments


def scheduler_steps(run_dir: Path, step: int, stages: int) -> list[int]:
    folder = run_dir / "checkpoints" / f"step_{step:07d}"
    return [torch.load(folder / f"mp_rank_{s:02d}_model_states.pt", weights_only=False)["lr_scheduler"]
            ["last_batch_iteration"] for s in range(stages)]


def stage_metrics(run_dir: Path, stage: int) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / f"metrics_stage{stage}.jsonl").read_text().splitlines())}


def skip_run(method, fault, tmp_path, cache_dir, text_corpus, port, extra=(), ranks=2, name="run"):
    out = tmp_path / name
    args = ARGS + ["--deepspeed_config", "ds_configs/test-1m.json", "--method", method, "--data", str(text_corpus),
                   "--on_nonfinite", "skip", "--out", str(out), *extra]
    result = run_pretrain(args, ranks, cache_dir, master_port=port, env={nonfinite.INJECT_ENV: fault})
    assert result.returncode == 0, launch_failure(result)
    return out, result


@pytest.fixture(scope="module")
def bll_skipped(tmp_path_factory, cache_dir, text_corpus):
    """BLL, stage 0's step 5 poisoned (loss and gradients)."""
    return skip_run("bll", "5:0", tmp_path_factory.mktemp("bll-skip"), cache_dir, text_corpus, 29671)


@pytest.mark.launcher
def test_bll_skips_only_the_stage_that_went_non_finite(bll_skipped):
    out, result = bll_skipped
    before, after, later = (stage_state(out, s, [0, 1, 2], 0) for s in (4, 5, 6))
    assert same_state(before, after) and not same_state(after, later)  # weights and AdamW moments untouched
    assert not same_state(stage_state(out, 4, [3, 4, 5], 1), stage_state(out, 5, [3, 4, 5], 1))  # stage 1 trained on
    assert scheduler_steps(out, 5, 2) == [n + 1 for n in scheduler_steps(out, 4, 2)] == [4, 4]  # kept its place
    stage0, stage1 = stage_metrics(out, 0), stage_metrics(out, 1)
    assert stage0[5].get("stage/skipped") == 1 and "stage/loss" not in stage0[5]
    assert "stage/skipped" not in stage1[5] and all("stage/skipped" not in stage0[s] for s in stage0 if s != 5)
    summary = json.loads((out / "summary.json").read_text())
    assert [s["skipped_steps"] for s in summary["stages_detail"]] == [1, 0]
    assert "the training loss is non-finite (nan) at step 5 on stage 0; update skipped (1 in a row" in result.stdout
    assert all(loss == loss for loss in train_losses(out).values())  # the LM loss stayed finite


@pytest.mark.launcher
def test_the_emulator_skips_exactly_as_the_launched_pipeline(bll_skipped, tmp_path, cache_dir, text_corpus):
    """--emulate with the same fault: stage 0 alone skips step 5, and every logged figure matches."""
    launched, _ = bll_skipped
    emulated = tmp_path / "emulated"
    args = ARGS + ["--deepspeed_config", "ds_configs/test-1m.json", "--method", "bll", "--data", str(text_corpus),
                   "--on_nonfinite", "skip", "--out", str(emulated), "--emulate"]
    result = run_pretrain(args, None, cache_dir, env={nonfinite.INJECT_ENV: "5:0"})
    assert result.returncode == 0, launch_failure(result)
    for stage in (0, 1):
        mine, theirs = stage_metrics(emulated, stage), stage_metrics(launched, stage)
        for step in range(1, STEPS + 1):
            assert mine[step].get("stage/skipped") == theirs[step].get("stage/skipped"), (stage, step)
            assert mine[step].get("stage/loss") == theirs[step].get("stage/loss"), (stage, step)
    assert stage_metrics(emulated, 0)[5]["stage/skipped"] == 1 and "stage/skipped" not in stage_metrics(emulated, 1)[5]
    detail = json.loads((emulated / "summary.json").read_text())["stages_detail"]
    assert [d["skipped_steps"] for d in detail] == [1, 0]


# bf16 runs 5-60x slower than fp32 on CPUs without bf16 units (86 s here): make test-all.
@pytest.mark.launcher
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_a_skipped_step_leaves_nothing_behind(precision, bll_skipped, tmp_path, cache_dir, text_corpus, repo):
    """Stopped right after the skipped step and resumed (with empty gradient buffers): the same
    curve and weights as straight through, so the skip left no gradient in any buffer. bf16 runs
    DeepSpeed's BF16_Optimizer (ZeRO-1, fp32 accumulation), which keeps its own fp32 gradients;
    its fault poisons the loss only, so a leaked gradient would be finite and silent."""
    if precision == "fp32":
        straight, fault, extra = bll_skipped[0], "5:0", []
    else:
        cfg = json.loads((repo / "ds_configs/test-1m.json").read_text())
        cfg.update(bf16={"enabled": True}, zero_optimization={"stage": 1}, data_types={"grad_accum_dtype": "fp32"})
        (tmp_path / "ds.json").write_text(json.dumps(cfg))
        fault, extra = "5:0:loss", ["--deepspeed_config", str(tmp_path / "ds.json")]
        straight, _ = skip_run("bll", fault, tmp_path, cache_dir, text_corpus, 29679, extra=extra, name="straight")
    port = 29672 if precision == "fp32" else 29680
    out, _ = skip_run("bll", fault, tmp_path, cache_dir, text_corpus, port, extra=[*extra, "--exit_interval", "5"])
    out, _ = skip_run("bll", fault, tmp_path, cache_dir, text_corpus, port + 1, extra=[*extra, "--resume"])
    summary = json.loads((out / "summary.json").read_text())
    assert [s["skipped_steps"] for s in summary["stages_detail"]] == [1, 0]  # restored from the checkpoint
    assert train_losses(out) == train_losses(straight)
    for layer in range(6):
        a, b = (torch.load(run / "checkpoints" / f"step_{STEPS:07d}" / f"layer_{layer:02d}-model_states.pt",
                           weights_only=True) for run in (out, straight))
        assert all(torch.equal(a[k], b[k]) for k in a), layer


@pytest.mark.launcher
def test_zero1_replicas_skip_together_when_only_the_loss_is_non_finite(tmp_path, cache_dir, text_corpus, repo):
    """Replica 1 of the last stage sees a NaN loss with finite gradients: only its loss check can
    see it. ZeRO-1 over 2 replicas: replica 0 learns of it from the agreement, both drop their
    gradients before the all-reduce, and the replicas stay identical."""
    cfg = json.loads((repo / "ds_configs/test-1m.json").read_text())
    cfg["zero_optimization"] = {"stage": 1}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out, result = skip_run("bll", "5:1:loss:1", tmp_path, cache_dir, text_corpus, 29674, ranks=4,
                           extra=["--deepspeed_config", str(tmp_path / "ds.json")])
    # Announced by the stage's first replica, which found nothing wrong itself.
    assert "the step is non-finite on another rank that shares stage 1's update, at step 5" in result.stdout
    assert same_state(stage_state(out, 4, [3, 4, 5], 1, zero_stage=1), stage_state(out, 5, [3, 4, 5], 1, zero_stage=1))
    assert not same_state(stage_state(out, 4, [0, 1, 2], 0, zero_stage=1),
                          stage_state(out, 5, [0, 1, 2], 0, zero_stage=1))
    summary = json.loads((out / "summary.json").read_text())
    assert [s["skipped_steps"] for s in summary["stages_detail"]] == [0, 1]
    assert all(s["replicas_identical"] for s in summary["stages_detail"])
    logged = {m["step"]: m for m in read_metrics(out)}  # by replica 0, whose own loss was finite
    assert logged[5]["train/skipped"] == 1 and all("train/skipped" not in logged[s] for s in logged if s != 5)


@pytest.mark.launcher
def test_backprop_stages_skip_together(tmp_path, cache_dir, text_corpus):
    """Only the last stage has a loss. Poisoned in value only, its gradients (and so stage 0's)
    stay finite: stage 0 learns of the bad step from the pipeline-wide agreement alone."""
    out, result = skip_run("bp", "5:1:loss", tmp_path, cache_dir, text_corpus, 29675)
    assert ("the step is non-finite on another rank that shares stage 0's update, at step 5 on stage 0; "
            "update skipped") in result.stdout
    for stage, layers in ((0, [0, 1, 2]), (1, [3, 4, 5])):
        assert same_state(stage_state(out, 4, layers, stage), stage_state(out, 5, layers, stage))
        assert not same_state(stage_state(out, 5, layers, stage), stage_state(out, 6, layers, stage))
    summary = json.loads((out / "summary.json").read_text())
    assert [s["skipped_steps"] for s in summary["stages_detail"]] == [1, 1]
    assert scheduler_steps(out, 5, 2) == [n + 1 for n in scheduler_steps(out, 4, 2)] == [4, 4]


@pytest.mark.launcher
def test_stop_names_the_step_the_stage_and_the_last_good_checkpoint(tmp_path, cache_dir, text_corpus):
    out = tmp_path / "run"
    args = ARGS + ["--deepspeed_config", "ds_configs/test-1m.json", "--method", "bll", "--data", str(text_corpus),
                   "--out", str(out)]
    args[args.index("--save_interval") + 1] = "3"
    result = run_pretrain(args, 2, cache_dir, master_port=29676, env={nonfinite.INJECT_ENV: "5:0"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert ("bll-ds: error: the training loss is non-finite (nan) at step 5 on stage 0; its update was not "
            "applied. Fix: resume (--resume) from the last good checkpoint, step_0000003, after lowering "
            "optimizer.params.lr (or gradient_clipping) in ds_configs/test-1m.json (the resumed steps use the new "
            "values), or pass --on_nonfinite skip to drop such steps and go on."
            in errors), launch_failure(result)
    # Stage 1 was waiting for stage 0: if the launcher has not killed it first, it says so in one line.
    assert all("non-finite" in e or "lost its connection to another rank" in e for e in errors)
    assert "Traceback" not in result.stderr


@pytest.mark.launcher
def test_a_real_divergence_is_skipped_then_stopped(tmp_path, cache_dir, text_corpus, repo):
    """lr 1e6: the gradients overflow within a few steps while the loss stays finite, and keep
    overflowing. The steps are skipped until a stage passes --max_consecutive_skips."""
    cfg = json.loads((repo / "ds_configs/test-1m.json").read_text())
    cfg["optimizer"]["params"]["lr"] = 1e6
    cfg.pop("scheduler")
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    args = ARGS + ["--deepspeed_config", str(tmp_path / "ds.json"), "--method", "bll", "--data", str(text_corpus),
                   "--out", str(tmp_path / "run"), "--on_nonfinite", "skip", "--max_consecutive_skips", "3"]
    args[args.index("--steps") + 1] = "40"
    args[args.index("--save_interval") + 1] = "0"
    result = run_pretrain(args, 2, cache_dir, master_port=29677, timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("bll-ds: error:")]
    expected = r"stage \d skipped 4 steps in a row \(steps \d+\.\.\d+\): the run has diverged"
    assert errors and all(re.search(expected, e) or "lost its connection" in e for e in errors), launch_failure(result)
    assert any(re.search(expected, e) for e in errors)
    assert "the gradients are non-finite at step" in result.stdout  # finite loss, overflowing gradients
    assert "Traceback" not in result.stderr
