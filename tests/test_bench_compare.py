"""The benchmark harness: run order, per-M configs, aggregation and paired ratios, and one real
interleaved BP-against-BLL benchmark through the deepspeed launcher."""

import json

import pytest

from bll_bench import compare, report
from bll_ds.infra.errors import UserError
from helpers import cpu_env


def _cfg(**kw):
    base = dict(model="m.json", deepspeed_config="d.json", out="o", arms=("bp", "bll"), micro_batches=(2, 4),
                repeats=3)
    return compare.BenchConfig(**{**base, **kw})


def test_schedule_interleaves_arms_and_alternates_their_order():
    order = compare.schedule(_cfg())
    assert len(order) == 3 * 2 * 2
    assert order[:4] == [(0, 2, 0.0, "bp"), (0, 2, 0.0, "bll"), (0, 4, 0.0, "bp"), (0, 4, 0.0, "bll")]
    assert order[4:6] == [(1, 2, 0.0, "bll"), (1, 2, 0.0, "bp")]  # reversed on odd repeats: drift hits both arms
    slow = compare.schedule(_cfg(micro_batches=(4,), link_delays_ms=(0.0, 20.0), repeats=1))
    assert slow == [(0, 4, 0.0, "bp"), (0, 4, 0.0, "bll"), (0, 4, 20.0, "bp"), (0, 4, 20.0, "bll")]
    assert compare.run_name(0, 4, 20.0, "peer:zbv") == "M4-L20ms-peer-zbv-r0"
    assert compare.run_name(1, 4, 0.0, "bll") == "M4-bll-r1"  # folders of benchmarks without delays keep their names


def test_ds_config_per_micro_batch_count(tmp_path):
    src = tmp_path / "ds.json"
    src.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4,
                               "train_batch_size": 16}))
    path = compare.ds_config_for(_cfg(deepspeed_config=str(src)), 8, tmp_path)
    ds = json.loads(path.read_text())
    assert ds["gradient_accumulation_steps"] == 8 and "train_batch_size" not in ds
    fixed = compare.ds_config_for(_cfg(deepspeed_config=str(src), sequences_per_step=12), 4, tmp_path)
    assert json.loads(fixed.read_text())["train_micro_batch_size_per_gpu"] == 3
    with pytest.raises(UserError, match="not divisible"):
        compare.ds_config_for(_cfg(deepspeed_config=str(src), sequences_per_step=12), 8, tmp_path)
    with pytest.raises(UserError, match="cannot read the DeepSpeed config"):
        compare.ds_config_for(_cfg(deepspeed_config=str(tmp_path / "missing.json")), 8, tmp_path)


def test_peer_arms_launch_the_peer_script_and_count_as_backprop():
    assert compare.arm_args("peer:zbv") == ["--schedule", "zbv"]
    assert compare.arm_script("peer:zbv") == "peer_pretrain.py" and compare.arm_script("bll") == "pretrain.py"
    assert compare.is_backprop("bp") and compare.is_backprop("peer:1f1b") and not compare.is_backprop("bll")
    with pytest.raises(UserError, match="peer schedule"):
        compare.arm_args("peer:gpipe")
    runs = [{"arm": "bp", "M": 4, "val_loss": 2.0}, {"arm": "bp", "M": 4, "val_loss": 2.2},
            {"arm": "peer:zbv", "M": 4, "val_loss": 2.05}, {"arm": "bll", "M": 4, "val_loss": 1.0}]
    assert compare.best_backprop_loss(runs) == pytest.approx(2.05)  # medians: bp 2.1, zbv 2.05; bll is not BP


def test_unknown_arm_is_a_clear_error():
    with pytest.raises(UserError, match="unknown arm"):
        compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o", "--arms", "bp,gpipe"])


def test_a_variant_arm_trains_that_variant_and_an_unknown_variant_fails_before_any_launch():
    cfg = compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o",
                              "--arms", "bp,bll,bll:dgl-overlap"])
    cmd = compare.launch_command(cfg, "bll:dgl-overlap", compare.Path("ds.json"), compare.Path("run"))
    assert cmd[cmd.index("--bll_variant") + 1] == "dgl-overlap" and "--bll_steps_per_call" in cmd
    assert "--bll_variant" not in compare.launch_command(cfg, "bll", compare.Path("ds.json"), compare.Path("run"))
    assert compare.arm_dir_name("bll:dgl-overlap") == "bll-dgl-overlap"
    with pytest.raises(ValueError, match="unknown BLL variant 'nope'"):
        compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o", "--arms", "bll:nope"])
    with pytest.raises(UserError, match="unknown arm"):
        compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o", "--arms", "bp:dgl"])


def test_extra_arguments_after_double_dash_reach_every_run():
    cfg = compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o", "--", "--seq_len", "64"])
    cmd = compare.launch_command(cfg, "bll", compare.Path("ds.json"), compare.Path("run"))
    assert cmd[-2:] == ["--seq_len", "64"] and "--bll_steps_per_call" in cmd


def _run(repeat, m, arm, tps, act0, loss=2.0):
    return {"repeat": repeat, "M": m, "arm": arm, "tokens_per_s": tps, "tokens_per_s_mean": tps * 0.9,
            "step_s_median": 1.0, "val_loss": loss, "wall_s": 10.0, "launcher_wall_s": 12.0,
            "target_wall_s": None, "target_train_s": None, "utilisation": [0.5, 0.6],
            "peak_rss_mb": [100.0, 90.0], "activation_peak_mb": [act0, 5.0], "mfu": [None, None],
            "mfu_measured_peak": [None, None]}


def test_aggregate_pairs_each_run_with_the_baseline_of_its_repeat():
    runs = [_run(0, 4, "bp", 100, 10.0), _run(0, 4, "bll", 130, 5.0, 2.02),
            _run(1, 4, "bp", 50, 10.0), _run(1, 4, "bll", 60, 5.0),
            _run(2, 4, "bp", 100, 10.0), _run(2, 4, "bll", 110, 5.0)]
    result = compare.aggregate(runs, _cfg(micro_batches=(4,)))
    bll = next(g for g in result["groups"] if g["arm"] == "bll")
    assert bll["tokens_per_s"] == {"median": 110, "min": 60, "max": 130, "n": 3}
    (ratio,) = result["ratios"]
    # Paired: 1.3, 1.2, 1.1 -> median 1.2 (the unpaired ratio of medians would be 110/100).
    assert ratio["tokens_per_s"]["median"] == pytest.approx(1.2)
    assert ratio["stage0_activation"]["median"] == pytest.approx(0.5)
    assert ratio["val_loss"]["max"] == pytest.approx(1.01)
    table = report.markdown({"config": vars(_cfg(micro_batches=(4,))), "command": "x", "runs": runs, **result})
    assert "| 4 | 0 | bll / bp | 1.200 (1.100-1.300) |" in table


def test_slow_link_runs_pair_by_delay_and_report_what_each_arm_keeps():
    def run(repeat, arm, delay, tps):
        return {**_run(repeat, 4, arm, tps, 10.0), "link_delay_ms": delay}

    runs = [run(0, "peer:zbv", 0.0, 100), run(0, "bll", 0.0, 90), run(0, "peer:zbv", 20.0, 40),
            run(0, "bll", 20.0, 88)]
    cfg = _cfg(micro_batches=(4,), arms=("peer:zbv", "bll"), link_delays_ms=(0.0, 20.0), baseline="peer:zbv",
               repeats=1)
    result = compare.aggregate(runs, cfg)
    ratios = {r["link_delay_ms"]: r for r in result["ratios"]}
    assert ratios[0.0]["vs"] == "peer:zbv" and ratios[0.0]["tokens_per_s"]["median"] == pytest.approx(0.9)
    assert ratios[20.0]["tokens_per_s"]["median"] == pytest.approx(2.2)  # 88 / 40: paired within the delay
    kept = {r["arm"]: r["tokens_per_s"]["median"] for r in result["delay_retention"]}
    assert kept == {"peer:zbv": pytest.approx(0.4), "bll": pytest.approx(88 / 90)}
    table = report.markdown({"config": vars(cfg), "command": "x", "runs": runs, **result})
    assert "| 4 | 20 | bll | 0.978 |" in table and "| 4 | 20 | bll / peer:zbv | 2.200 |" in table
    cmd = compare.launch_command(compare.parse_args(["--model", "m", "--deepspeed_config", "d", "--out", "o"]),
                                 "bll", compare.Path("ds.json"), compare.Path("run"), 5.0)
    assert cmd[cmd.index("--link_delay_ms") + 1] == "5"


def test_report_shows_each_mfu_where_a_run_has_it():
    """On CPUs only the measured-peak MFU exists; on a known GPU both; a summary.json written
    before mfu_measured_peak existed held the measured-peak figure under mfu."""
    assert compare.stage_mfu({"mfu": 0.4, "mfu_measured_peak": 0.6}) == (0.4, 0.6)
    assert compare.stage_mfu({"mfu": 0.6}) == (None, 0.6)
    assert compare.stage_mfu({"mfu": None, "mfu_measured_peak": None}) == (None, None)
    cfg = _cfg(micro_batches=(4,), repeats=1)

    def table(mfu, measured):
        runs = [{**_run(0, 4, arm, 100, 10.0), "mfu": mfu, "mfu_measured_peak": measured} for arm in ("bp", "bll")]
        return report.markdown({"config": vars(cfg), "command": "x", "runs": runs, **compare.aggregate(runs, cfg)})

    cpu = table([None, None], [0.61, 0.62])
    assert "| MFU vs measured peak per stage |" in cpu and "| MFU per stage |" not in cpu
    assert "| 0.610 / 0.620 |" in cpu and "datasheet" not in cpu
    gpu = table([0.41, 0.42], [0.61, 0.62])
    assert "| MFU per stage | MFU vs measured peak per stage |" in gpu and "| 0.410 / 0.420 | 0.610 / 0.620 |" in gpu
    assert "datasheet dense peak" in gpu
    header, rule, row = [line for line in gpu.splitlines() if line.startswith("| M | link")
                         or line.startswith("| ---") or line.startswith("| 4 | 0 | bll |")][:3]
    assert header.count("|") == rule.count("|") == row.count("|")
    neither = table([None, None], [None, None])
    assert "MFU" not in neither


def test_read_run_counts_drains_in_the_mean_and_finds_the_target(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"stages": 2, "tokens_per_step": 100, "val_loss": 1.9, "wall_s": 20.0, "train_wall_s": 5.0,
               "tokens_per_s": 100.0, "step_s_median": 1.0, "started_at": 1000.0,
               "stages_detail": [{"utilisation": 0.9, "peak_rss_mb": 1, "grads_sent": 0}] * 2}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics_stage1.jsonl").write_text("".join(
        json.dumps({"step": s, "stage/step_s": 3.0 if s == 4 else 1.0}) + "\n" for s in range(1, 5)))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 2, "time": 1010.0, "val/loss": 2.5}, {"step": 4, "time": 1015.0, "val/loss": 1.9}]))
    got = compare.read_run(run, warmup_steps=2, target_loss=2.0)
    assert got["tokens_per_s_mean"] == pytest.approx(200 / 4.0)  # steps 3 and 4, the drain (3 s) included
    assert got["target_step"] == 4 and got["target_wall_s"] == pytest.approx(15.0)
    assert got["target_train_s"] == pytest.approx(6.0)


@pytest.mark.launcher
def test_compare_runs_bp_and_bll_interleaved_and_writes_results(tmp_path, cache_dir, text_corpus, monkeypatch):
    for key, value in cpu_env().items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "bench"
    argv = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
            "--data", str(text_corpus), "--tokenizer", "char", "--steps", "4", "--micro_batches", "2",
            "--arms", "bp,bll,peer:1f1b", "--repeats", "1", "--warmup_steps", "1", "--final_eval_batches", "2",
            "--target_loss", "best-bp",
            "--master_port", "29641", "--out", str(out), "--", "--seq_len", "32", "--cache_dir", str(cache_dir)]
    assert compare.main(argv) == 0
    result = json.loads((out / "bench.json").read_text())
    runs = {r["arm"]: r for r in result["runs"]}
    assert runs["bp"]["grads_sent"] > 0 and runs["bll"]["grads_sent"] == 0
    # torch's Schedule1F1B trains what DeepSpeed's 1F1B trains: the same losses step by step.
    assert [s for s, _ in runs["peer:1f1b"]["train_loss"]] == [1, 2, 3, 4]
    assert [loss for _, loss in runs["peer:1f1b"]["train_loss"]] == \
        pytest.approx([loss for _, loss in runs["bp"]["train_loss"]], rel=1e-4)
    assert runs["peer:1f1b"]["val_loss"] == pytest.approx(runs["bp"]["val_loss"], rel=1e-4)
    # best-bp: the lower final held-out loss of the two backprop arms, reached by that arm.
    assert result["target_loss"] == min(runs[a]["val"][-1][1] for a in ("bp", "peer:1f1b"))
    assert any(runs[a]["target_step"] == 4 for a in ("bp", "peer:1f1b"))
    # 1F1B stashes 2 micro-batches at stage 0 of 2; BLL holds one plus its local readout.
    assert runs["bll"]["activation_peak_mb"][0] < runs["bp"]["activation_peak_mb"][0]
    assert all(u is not None and 0 < u <= 1 for arm in ("bp", "bll") for u in runs[arm]["utilisation"])
    assert result["ratios"][0]["tokens_per_s"]["n"] == 1
    for name in ("bench.md", "loss_vs_tokens.png", "loss_vs_seconds.png", "heldout_vs_wall.png", "timeline.png",
                 "memory.png"):
        assert (out / name).stat().st_size > 0
    # A second invocation reuses finished runs instead of launching them again.
    before = (out / "runs" / "M2-bp-r0" / "summary.json").stat().st_mtime
    assert compare.main(argv) == 0
    assert (out / "runs" / "M2-bp-r0" / "summary.json").stat().st_mtime == before
