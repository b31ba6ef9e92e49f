"""--config FILE: a run described by a JSON or YAML file fills the same RunConfig as the flags,
the command line overrides it, and a run dir's run_config.json reproduces the run."""

import dataclasses
import json

import pytest

from bll_ds.infra.errors import UserError
from bll_ds.run.config import parse_run_config
from helpers import REPO, read_metrics, run_script

BASE = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json", "--out", "runs/x"]


def test_a_yaml_file_fills_the_same_config_as_the_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: models/test-1m.json\ndeepspeed_config: ds_configs/test-1m.json\nout: runs/x\n"
                      "stages: 4\nemulate: true\nds_set: [optimizer.params.lr=3e-4]\n"
                      "bll:\n  variant: dgl-context\n  steps_per_call: 8\n"
                      "checkpoint:\n  keep: 0\n  resume: auto\nmetrics:\n  progress: false\n")
    from_flags = parse_run_config(BASE + ["--stages", "4", "--emulate", "--ds_set", "optimizer.params.lr=3e-4",
                                          "--bll_variant", "dgl-context", "--bll_steps_per_call", "8",
                                          "--keep_checkpoints", "0", "--resume", "auto", "--no-progress"])
    assert parse_run_config(["--config", str(recipe)]) == from_flags
    assert from_flags.bll.steps_per_call == 8 and from_flags.checkpoint.keep == 0 and not from_flags.metrics.progress


def test_flags_beside_the_file_override_it(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": "models/test-1m.json", "deepspeed_config": "ds_configs/test-1m.json",
                                  "out": "runs/x", "stages": 4, "metrics": {"progress": False},
                                  "ds_set": ["optimizer.params.lr=1e-3"]}))
    cfg = parse_run_config(["--config", str(recipe), "--stages=2", "--progress", "--ds_set", "optimizer.params.lr=2e-3"])
    assert cfg.stages == 2 and cfg.metrics.progress
    # --ds_set adds to the file's list; applied in order, the last value of a key wins.
    assert cfg.ds_set == ["optimizer.params.lr=1e-3", "optimizer.params.lr=2e-3"]


def test_a_run_config_round_trips_and_another_out_starts_afresh(tmp_path):
    cfg = parse_run_config(BASE + ["--stages", "4", "--seed", "7", "--resume", "yes", "--bll_variant", "dgl:dim=4",
                                   "--eval_interval", "3", "--init_from", "runs/y"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert parse_run_config(["--config", str(run_dir)]) == cfg
    # The recorded resume belongs to the recorded run dir, not to a new one.
    again = parse_run_config(["--config", str(run_dir / "run_config.json"), "--out", "runs/new"])
    assert again.out == "runs/new" and again.checkpoint.resume == "no"
    assert dataclasses.replace(again, out=cfg.out, checkpoint=cfg.checkpoint) == cfg
    assert parse_run_config(["--config", str(run_dir), "--out", "runs/new", "--resume"]).checkpoint.resume == "yes"


@pytest.mark.parametrize("text, words", [
    ('{"modle": "m"}', "unknown field `modle` in the top level. Fix: did you mean `model`?"),
    ('{"bll": {"varient": "dgl"}}', "unknown field `varient` in section `bll`. Fix: did you mean `variant`?"),
    ('{"bll": "dgl"}', "`bll` is a section and takes a mapping"),
    ('{"stages": null}', "`stages: null` is not a value"),
    ('{"emulate": "yes"}', "`emulate` takes true or false"),
    ('{"stages": [2]}', "`stages` takes one value"),
    ('[1, 2]', "holds a list, not a mapping"),
    ('{"stages": 2,', "not valid JSON"),
])
def test_a_bad_file_is_one_line_naming_the_field(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        parse_run_config(BASE + ["--config", str(path)])
    assert words in str(err.value) and str(path) in str(err.value)


def test_a_missing_file_and_bad_yaml_are_named(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_run_config(BASE + ["--config", str(tmp_path / "none.yaml")])
    (tmp_path / "bad.yaml").write_text("stages: [2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_run_config(BASE + ["--config", str(tmp_path / "bad.yaml")])


def test_a_wrong_type_in_the_file_is_refused_by_the_flags_own_check(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"stages": "two"}')
    with pytest.raises(SystemExit):
        parse_run_config(BASE + ["--config", str(tmp_path / "r.json")])
    assert "--stages: invalid int value: 'two'" in capsys.readouterr().err


def test_every_recipe_parses():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ holds the named runs"
    for recipe in recipes:
        cfg = parse_run_config(["--config", str(recipe)])
        assert (REPO / cfg.model).is_file() and (REPO / cfg.deepspeed_config).is_file(), recipe.name


def test_a_run_reproduced_from_its_run_config_has_the_same_losses(tmp_path, cache_dir, text_corpus):
    """A tiny emulated run with a --ds_set override, then again from its run dir with --config: the
    same per-step losses, and the override recorded in both run dirs' ds_config.json."""
    first = tmp_path / "first"
    args = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json", "--emulate",
            "--tokenizer", "char", "--seq_len", "32", "--stages", "2", "--log_interval", "1", "--eval_interval", "0",
            "--final_eval_batches", "2", "--no-measure_matmul_peak", "--no-progress", "--steps", "6",
            "--ds_set", "optimizer.params.lr=2e-3", "--data", str(text_corpus), "--cache_dir", str(cache_dir)]
    done = run_script(REPO / "scripts" / "pretrain.py", args + ["--out", str(first)])
    assert done.returncode == 0, done.stderr[-2000:]
    second = tmp_path / "second"
    done = run_script(REPO / "scripts" / "pretrain.py", ["--config", str(first), "--out", str(second)])
    assert done.returncode == 0, done.stderr[-2000:]

    def losses(run_dir):
        return [(m["step"], m["train/loss"]) for m in read_metrics(run_dir) if "train/loss" in m]

    assert len(losses(first)) == 6 and losses(second) == losses(first)
    for run_dir in (first, second):
        assert json.loads((run_dir / "ds_config.json").read_text())["optimizer"]["params"]["lr"] == 2e-3


def test_a_benchmark_recipe_fills_the_same_config_as_the_flags(tmp_path):
    from bll_bench.compare import parse_args

    flags = ["--model", "models/llama-25m.json", "--deepspeed_config", "ds_configs/llama-25m.json", "--data",
             "tokens:runs/kernel-docs-bpe4096", "--stages", "2", "--steps", "400", "--micro_batches", "4",
             "--warmup_steps", "5", "--eval_interval", "25", "--eval_batches", "20", "--final_eval_batches", "20",
             "--target_loss", "best-bp", "--arms", "peer:zbv,bll:dgl-context:dim=64:neg=2048", "--baseline",
             "peer:zbv", "--repeats", "1", "--master_port", "29817", "--out", "results/time-to-loss-zbv-l25"]
    recipe = str(REPO / "recipes/bench/time-to-loss-zbv-l25.yaml")
    assert parse_args(["--config", recipe]) == parse_args(flags)
    assert parse_args(["--config", recipe, "--repeats", "2"]).repeats == 2
    for recipe in sorted((REPO / "recipes/bench").glob("*.yaml")):
        if "testbed" not in recipe.name and "nanogpt" not in recipe.name:  # the nanogpt arm needs a checkout
            assert parse_args(["--config", str(recipe)]).out, recipe.name
    (tmp_path / "bad.yaml").write_text("arm: [bp]\n")
    with pytest.raises(UserError, match="unknown field `arm`.*did you mean `arms`"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])


def test_the_testbed_sweep_recipes_list_their_runs(capsys):
    from bll_bench.sweep import main

    for name in ("testbed-kernel-char-s8", "testbed-kernel-char-s16"):
        assert main(["--config", str(REPO / f"recipes/bench/{name}.yaml"), "--list"]) == 0
        assert "scripts/pretrain.py --emulate" in capsys.readouterr().out
