"""Launch-shape validation: every bad combination is refused with a message naming the fix."""

import json

import pytest

from bll_ds.infra.errors import UserError
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.run.config import RunConfig, parse_run_config
from bll_ds.run.ds_config import load_ds_config


def write(tmp_path, cfg: dict):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_two_batch_sizes_fix_the_third(tmp_path):
    ds = load_ds_config(write(tmp_path, {"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3}),
                        world_size=4, stages=2, steps=10)
    assert (ds.data_parallel, ds.micro_batch_size, ds.micro_batches, ds.train_batch_size) == (2, 3, 4, 24)
    assert ds.config["gradient_accumulation_steps"] == 4
    ds = load_ds_config(write(tmp_path, {"train_batch_size": 12, "gradient_accumulation_steps": 4}),
                        world_size=2, stages=2, steps=10)
    assert (ds.micro_batch_size, ds.micro_batches) == (3, 4)


def test_batch_sizes_that_do_not_divide_are_refused(tmp_path):
    with pytest.raises(UserError, match="not divisible") as err:
        load_ds_config(write(tmp_path, {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 5}),
                       world_size=2, stages=2, steps=10)
    assert "multiple of 5" in err.value.fix
    with pytest.raises(UserError, match=r"train_batch_size 13 != micro-batch 3 x accumulation 4 x 1"):
        load_ds_config(write(tmp_path, {"train_batch_size": 13, "train_micro_batch_size_per_gpu": 3,
                                        "gradient_accumulation_steps": 4}), world_size=2, stages=2, steps=10)
    with pytest.raises(UserError, match="does not fix the batch size"):
        load_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 3}), world_size=2, stages=2, steps=10)
    with pytest.raises(UserError, match="not a positive integer"):
        load_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 0, "gradient_accumulation_steps": 2}),
                       world_size=2, stages=2, steps=10)


def test_world_size_must_be_a_multiple_of_the_stages(tmp_path):
    with pytest.raises(UserError, match="3 ranks cannot be split into 2 pipeline stages"):
        load_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}),
                       world_size=3, stages=2, steps=10)


def test_zero_stage_beyond_one_is_refused(tmp_path):
    with pytest.raises(UserError, match="ZeRO stage 2"):
        load_ds_config(write(tmp_path, {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                        "zero_optimization": {"stage": 2}}), world_size=2, stages=2, steps=10)


def test_bf16_gradient_dtypes_follow_deepspeed_and_an_impossible_mix_is_refused(tmp_path):
    """The dtypes the emulator mirrors: bf16 without ZeRO accumulates in bf16, ZeRO-1 may ask for
    fp32; bf16 runs all-reduce in bf16 unless communication_data_type says otherwise."""
    import torch

    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True}}
    ds = load_ds_config(write(tmp_path, base), world_size=2, stages=2, steps=1)
    assert (ds.grad_accum_dtype, ds.communication_dtype) == (torch.bfloat16, torch.bfloat16)
    zero1 = {**base, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"},
             "communication_data_type": "fp32"}
    ds = load_ds_config(write(tmp_path, zero1), world_size=2, stages=2, steps=1)
    assert (ds.grad_accum_dtype, ds.communication_dtype) == (torch.float32, torch.float32)
    fp32 = load_ds_config(write(tmp_path, {**base, "bf16": {"enabled": False}}), world_size=2, stages=2, steps=1)
    assert (fp32.grad_accum_dtype, fp32.communication_dtype) == (torch.float32, torch.float32)
    # DeepSpeed raises NotImplementedError for this mix on every rank, after the run dir exists.
    with pytest.raises(UserError, match="bf16 without ZeRO accumulates gradients in bf16") as err:
        load_ds_config(write(tmp_path, {**base, "data_types": {"grad_accum_dtype": "fp32"}}),
                       world_size=2, stages=2, steps=1)
    assert "zero_optimization.stage to 1" in err.value.fix
    with pytest.raises(UserError, match="'float64' is not a dtype DeepSpeed knows"):
        load_ds_config(write(tmp_path, {**zero1, "data_types": {"grad_accum_dtype": "float64"}}),
                       world_size=2, stages=2, steps=1)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_ds_config(str(tmp_path / "none.json"), world_size=1, stages=1, steps=1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_ds_config(str(tmp_path / "bad.json"), world_size=1, stages=1, steps=1)


def test_steps_set_the_scheduler_length(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000, "warmup_num_steps": 10}}}
    ds = load_ds_config(write(tmp_path, cfg), world_size=1, stages=1, steps=300)
    assert ds.steps == 300 and ds.config["scheduler"]["params"]["total_num_steps"] == 300
    assert load_ds_config(write(tmp_path, cfg), world_size=1, stages=1, steps=None).steps == 2000


def test_shipped_configs_resolve(repo):
    for path in sorted((repo / "ds_configs").glob("*.json")):
        ds = load_ds_config(str(path), world_size=2, stages=2, steps=None)
        assert ds.train_batch_size == ds.micro_batch_size * ds.micro_batches


def test_nanogpt_anchor_config_matches_the_recipe(repo):
    ds = load_ds_config(str(repo / "ds_configs/nanogpt-char.json"), world_size=2, stages=2, steps=None)
    opt = ds.config["optimizer"]["params"]
    sched = ds.config["scheduler"]["params"]
    assert (ds.micro_batches, ds.micro_batch_size, ds.steps) == (4, 3, 2000)
    assert (opt["lr"], opt["betas"][1], opt["weight_decay"], ds.config["gradient_clipping"]) == (1e-3, 0.99, 0.1, 1.0)
    assert (sched["warmup_num_steps"], sched["cos_min_ratio"]) == (100, 0.1)


def test_run_config_cli(tmp_path):
    cfg = parse_run_config(["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o",
                            "--seq-len", "32", "--no-progress", "--local_rank=1"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.seq_len, cfg.metrics.progress, cfg.method, cfg.stages, cfg.data) == (32, False, "bll", 2, None)
    assert cfg.bll.variant == DEFAULT_VARIANT == "critic-context:dim=128:neg=2048:labels=0.9:extrap=2" and cfg.bll.steps_per_call == 32
    with pytest.raises(SystemExit):
        parse_run_config(["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o", "--method", "sgd"])


def test_bf16_auto_follows_the_measured_matmul_peaks(tmp_path, monkeypatch):
    from bll_ds.measure import matmul_peak
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": "auto"}}
    # The two CPUs of the issue: EPYC with AVX512-BF16 and no AMX (bf16 2.4x fp32), and a CPU
    # whose bf16 products run at half its fp32 rate. Flags alone (no AMX on either) say fp32.
    for peaks, expected in (({"fp32": 87.0, "bf16": 206.0}, True), ({"fp32": 157.0, "bf16": 83.0}, False),
                            ({"fp32": 100.0, "bf16": 105.0}, False)):
        monkeypatch.setattr(matmul_peak, "matmul_peaks", lambda device, p=peaks: p)
        ds = load_ds_config(write(tmp_path, cfg), world_size=1, stages=1, steps=1)
        assert ds.bf16 is expected and ds.bf16_auto_peaks == peaks
        assert set(ds.config["bf16"]) == {"enabled"}  # DeepSpeed refuses keys it does not know there
    deferred = load_ds_config(write(tmp_path, cfg), world_size=1, stages=1, steps=1, defer_bf16_auto=True)
    assert deferred.bf16_auto
    with pytest.raises(RuntimeError, match="unresolved"):
        deferred.bf16
    cfg["bf16"]["enabled"] = True  # an explicit choice is never overridden, nor measured
    monkeypatch.setattr(matmul_peak, "matmul_peaks", lambda device: pytest.fail("measured an explicit choice"))
    assert load_ds_config(write(tmp_path, cfg), world_size=1, stages=1, steps=1).bf16 is True
