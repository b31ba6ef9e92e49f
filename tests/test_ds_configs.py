"""The GPU DeepSpeed configs load as the trainer loads them, and say what their names promise."""

from pathlib import Path

from bll_ds.run.ds_config import load_ds_config

REPO = Path(__file__).resolve().parents[1]


def test_llama_1b_gpu_config_is_bf16_fused_adam_zero1_with_m_4s_at_8_stages(monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.chdir(REPO)
    ds = load_ds_config("ds_configs/llama-1b-gpu.json", world_size=8, stages=8, steps=None)
    assert ds.micro_batches == 32 == 4 * 8
    assert ds.data_parallel == 1 and ds.micro_batch_size == 8 and ds.train_batch_size == 256
    assert ds.bf16 is True and ds.config["bf16"]["enabled"] is True
    assert ds.config["optimizer"]["type"] == "Adam"
    params = ds.config["optimizer"]["params"]
    assert params["torch_adam"] is False and params["adam_w_mode"] is True  # DeepSpeed's FusedAdam, AdamW mode
    assert ds.config["zero_optimization"]["stage"] == 1 and ds.config["gradient_clipping"] == 1.0
    assert ds.config["data_types"]["grad_accum_dtype"] == "fp32"  # bf16 + ZeRO-1: DeepSpeed's BF16_Optimizer
    assert ds.config["scheduler"]["type"] == "WarmupCosineLR" and ds.steps == 20000

    parsed = DeepSpeedConfig(load_ds_config("ds_configs/llama-1b-gpu.json", 1, 1, None).config)  # DeepSpeed's parser
    assert (parsed.optimizer_name, parsed.zero_optimization_stage) == ("adam", 1)
    assert parsed.gradient_accumulation_steps == 32
    assert parsed.optimizer_params["torch_adam"] is False and parsed.bfloat16_config.enabled
