"""The depth sweep's plan and table (no training: run dirs are written by hand here)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bll_bench import sweep
from bll_ds.infra.errors import UserError
from bll_ds.run import run_dir as names


def test_depth_plan_has_the_baseline_every_stage_count_and_the_truncated_models():
    runs = sweep.runs_of(sweep.PLANS["depth"])
    assert list(runs)[0] == "bp-L16"
    for s in (2, 4, 8, 16):
        for variant in ("prototype", "dgl"):
            assert runs[f"bll-{variant}-S{s}"][-2:] == ["--stages", str(s)]
    assert {name for name in runs if name.startswith("bp-")} == {"bp-L16", "bp-L8", "bp-L4", "bp-L2", "bp-L1"}
    assert runs["bp-L1"][-2:] == ["--truncate", "1"]


def _fake_run(out, name, curve, final=None, tokens_per_step=100):
    run = out / name
    run.mkdir(parents=True)
    lines = [{"step": step, "train/tokens_seen": step * tokens_per_step} for step, _ in curve]
    lines += [{"step": step, "val/loss": loss} for step, loss in curve]
    (run / names.METRICS).write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    if final is not None:
        (run / names.SUMMARY).write_text(json.dumps({"val_loss": final, "tokens_per_s": 1000.0, "steps": 10}))


def test_table_gives_ratio_and_recovered_fraction_at_the_end_and_half_way(tmp_path):
    _fake_run(tmp_path, "bp-L16", [(5, 5.0), (10, 4.0)], final=4.0)
    _fake_run(tmp_path, "bp-L8", [(5, 5.5), (10, 5.0)], final=5.0)   # what one of 2 stages holds
    _fake_run(tmp_path, "bll-prototype-S2", [(5, 5.25), (10, 4.2)], final=4.2)
    _fake_run(tmp_path, "bll-dgl-S2", [(5, 6.0)])                      # still running, half-way
    plan = dataclasses.replace(sweep.PLANS["depth"], steps=10)
    rows = {r["run"]: r for r in sweep.tabulate(plan, tmp_path)["rows"]}
    bll = rows["bll-prototype-S2"]
    assert bll["ratio_final"] == pytest.approx(4.2 / 4.0, abs=1e-4)
    assert bll["recovered_final"] == pytest.approx((5.0 - 4.2) / (5.0 - 4.0), abs=1e-3)
    assert bll["ratio_half"] == pytest.approx(5.25 / 5.0, abs=1e-4)
    assert bll["recovered_half"] == pytest.approx(0.5, abs=1e-3)
    assert not rows["bll-dgl-S2"]["complete"] and rows["bll-dgl-S2"]["ratio_final"] is None
    table = (tmp_path / "sweep.md").read_text()
    assert rows["bll-dgl-S2"]["ratio_half"] == pytest.approx(6.0 / 5.0, abs=1e-4)
    assert "bll-dgl-S2 (unfinished)" in table and "1.0500" in table
    assert (tmp_path / "sweep_val_loss.png").stat().st_size > 0


def test_unknown_run_name_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="bll-prototype-S3"):
        sweep.main(["--plan", "depth", "--out", str(tmp_path), "--only", "bll-prototype-S3"])


def test_list_prints_every_run_with_resume_once_checkpointed(tmp_path, capsys):
    (tmp_path / "bp-L16" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bp-L16" / "checkpoints" / names.LATEST).write_text("step_0000128")
    assert sweep.main(["--plan", "depth", "--out", str(tmp_path), "--list", "--", "--steps", "10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = dict(line.split(" ", 1) for line in printed if line.startswith(("bp-", "bll-")))
    assert "--resume" in lines["bp-L16"] and "--resume" not in lines["bp-L1"]
    assert lines["bp-L1"].rstrip().endswith("--steps 10") and "--emulate" in lines["bll-dgl-S16"]
    assert not (tmp_path / "sweep.md").exists() and not (tmp_path / "specs").exists()  # a listing writes nothing


def test_bll_runs_wait_until_depth_pays_for_backprop(tmp_path, capsys):
    """Where 16 layers end no lower than 1 layer, BLL runs would measure nothing about depth."""
    plan = sweep.PLANS["depth"]
    assert "has not finished" in sweep.depth_pays(plan, tmp_path, 0.05)
    _fake_run(tmp_path, "bp-L16", [(10, 3.85)], final=3.8455)
    _fake_run(tmp_path, "bp-L1", [(10, 3.83)], final=3.8339)
    verdict = sweep.depth_pays(plan, tmp_path, 0.05)
    assert "depth does not pay" in verdict and "+0.30%" in verdict
    assert sweep.main(["--plan", "depth", "--out", str(tmp_path), "--only", "bll-dgl-S2"]) == 3
    assert "stopped before bll-dgl-S2" in capsys.readouterr().err
    _fake_run(tmp_path, "bp-L8", [(10, 4.0)], final=4.0)  # unrelated runs do not change the verdict
    (tmp_path / "bp-L1" / names.SUMMARY).write_text(json.dumps({"val_loss": 4.2, "steps": 10}))
    assert sweep.depth_pays(plan, tmp_path, 0.05) is None


def test_variants_replace_the_plans_and_unknown_ones_are_refused(tmp_path, capsys):
    assert sweep.main(["--plan", "shakespeare", "--out", str(tmp_path), "--list",
                       "--variants", "prototype-aux"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "bll-prototype-aux-S8" in listed and "bll-prototype-S8" not in listed and "bp-L8" in listed
    with pytest.raises(UserError, match="not registered"):
        sweep.main(["--plan", "shakespeare", "--out", str(tmp_path), "--list", "--variants", "protoype"])


def test_the_table_keeps_every_run_in_the_folder_each_against_its_own_models_backprop(tmp_path):
    """Two plans and several --variants share a folder: a sweep of one keeps the others' rows."""
    _fake_run(tmp_path, "bp-L16", [(5, 5.0), (10, 4.0)], final=4.0)
    _fake_run(tmp_path, "bp-L8", [(5, 5.2), (10, 4.5)], final=4.5)
    _fake_run(tmp_path, "bp-L1", [(5, 6.0), (10, 5.5)], final=5.5)
    _fake_run(tmp_path, "bll-other-S8", [(5, 5.3), (10, 4.75)], final=4.75)    # a variant the plan does not name
    _fake_run(tmp_path, "bll-other-S16", [(5, 5.1), (10, 4.4)], final=4.4)     # the 16-layer plan's run
    (tmp_path / "bll-other-S16" / names.MODEL_CONFIG).write_text(json.dumps({"n_layer": 16}))  # gpt2's key
    (tmp_path / "bll-other-S8" / names.MODEL_CONFIG).write_text(json.dumps({"num_hidden_layers": 8}))
    plan = dataclasses.replace(sweep.PLANS["kernel-char-d8"], steps=10)
    rows = {r["run"]: r for r in sweep.tabulate(plan, tmp_path)["rows"]}
    assert [r for r in rows] == ["bp-L16", "bp-L8", "bp-L1", "bll-other-S8", "bll-other-S16"]
    assert rows["bll-other-S8"]["ratio_final"] == pytest.approx(4.75 / 4.5, abs=1e-4)
    assert rows["bll-other-S8"]["recovered_final"] == pytest.approx((5.5 - 4.75) / (5.5 - 4.5), abs=1e-3)
    assert rows["bll-other-S16"]["ratio_final"] == pytest.approx(4.4 / 4.0, abs=1e-4)
    assert rows["bll-other-S16"]["recovered_final"] == pytest.approx((5.5 - 4.4) / (5.5 - 4.0), abs=1e-3)


def test_another_seed_shares_the_folder_under_its_own_names(tmp_path, capsys):
    """--seed 2: runs are NAME-seed2; a BLL run compares with the same seed's backprop where it
    ran, else with the default seed's, and the depth gate reads the default seed's baselines."""
    assert sweep.parse_run_name("bll-dgl-context-man-S8-seed2") == {"variant": "dgl-context-man", "stages": 8,
                                                                     "seed": 2}
    assert sweep.parse_run_name("bp-L16") == {"layers": 16, "seed": sweep.DEFAULT_SEED}
    assert sweep.parse_run_name("tokenizer.model") is None
    assert "bll-dgl-context-S8-seed2" in sweep.runs_of(sweep.PLANS["kernel-char-d8"], seed=2)
    _fake_run(tmp_path, "bp-L8", [(5, 5.0), (10, 4.0)], final=4.0)
    _fake_run(tmp_path, "bp-L1", [(5, 6.0), (10, 5.0)], final=5.0)
    _fake_run(tmp_path, "bll-x-S8", [(5, 5.5), (10, 4.4)], final=4.4)
    _fake_run(tmp_path, "bll-x-S8-seed2", [(5, 5.5), (10, 4.6)], final=4.6)
    plan = dataclasses.replace(sweep.PLANS["kernel-char-d8"], steps=10)
    rows = {r["run"]: r for r in sweep.tabulate(plan, tmp_path)["rows"]}
    assert rows["bll-x-S8-seed2"]["ratio_final"] == pytest.approx(4.6 / 4.0, abs=1e-4)  # the default seed's bp
    _fake_run(tmp_path, "bp-L8-seed2", [(5, 5.0), (10, 4.2)], final=4.2)
    rows = {r["run"]: r for r in sweep.tabulate(plan, tmp_path)["rows"]}
    assert rows["bll-x-S8-seed2"]["ratio_final"] == pytest.approx(4.6 / 4.2, abs=1e-4)  # now its own seed's
    assert rows["bll-x-S8"]["ratio_final"] == pytest.approx(4.4 / 4.0, abs=1e-4)
    assert sweep.depth_pays(plan, tmp_path, 0.05, seed=2) is None
    printed = sweep.main(["--plan", "kernel-char-d8", "--out", str(tmp_path), "--seed", "2", "--list",
                          "--only", "bll-dgl-context-S8"])
    assert printed == 0 and "bll-dgl-context-S8-seed2" in capsys.readouterr().out


def test_plot_runs_draws_the_named_curves_alone_and_names_a_missing_one(tmp_path):
    _fake_run(tmp_path, "bp-L16", [(5, 5.0), (10, 4.0)], final=4.0)
    _fake_run(tmp_path, "bp-L8", [(5, 5.5), (10, 5.0)], final=5.0)
    _fake_run(tmp_path, "bll-prototype-S2", [(5, 5.25), (10, 4.2)], final=4.2)
    figure = tmp_path / "page" / "curves.png"
    assert sweep.main(["--plan", "depth", "--out", str(tmp_path), "--table_only",
                       "--plot_runs", "bp-L16,bll-prototype-S2", "--plot_path", str(figure)]) == 0
    assert figure.stat().st_size > 0
    with pytest.raises(UserError, match="bll-dgl-S2"):
        sweep.main(["--plan", "depth", "--out", str(tmp_path), "--table_only",
                    "--plot_runs", "bll-dgl-S2", "--plot_path", str(figure)])
    with pytest.raises(UserError, match="go together"):
        sweep.main(["--plan", "depth", "--out", str(tmp_path), "--table_only", "--plot_runs", "bp-L16"])
