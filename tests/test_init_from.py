"""--init_from: a run starts from a Hugging Face model folder's or another run's weights.

One short emulated run gives the vocabulary (its char tokenizer) and serves as a run-dir source;
a transformers LlamaForCausalLM of that shape, saved with save_pretrained, is the folder source.
Runs started from them with a zero learning rate must checkpoint exactly the source's weights,
so the fp32 masters that DeepSpeed's bf16 and ZeRO optimizers keep must have taken them too
(otherwise the first optimizer step writes the old initial weights back).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, launch_failure, run_pretrain

from bll_ds.infra.errors import UserError
from bll_ds.modeling import load_model_spec
from bll_ds.pipeline.emulated.emulator import EmulatedPipeline
from bll_ds.run.config import BLLConfig
from bll_ds.run.ds_config import load_ds_config
from bll_ds.run.init_weights import load_into
from bll_ds.run.run_dir import MODEL_CONFIG, checkpoints, layer_weights

SEQ = "32"


def _args(out, *extra):
    return ["--model", "models/test-1m.json", "--tokenizer", "char", "--seq_len", SEQ, "--eval_interval", "0",
            "--final_eval_batches", "1", "--no-measure_matmul_peak", "--out", str(out), *extra]


def _ds_config(folder, lr=0.0, bf16=False, zero=0):
    """test-1m's DeepSpeed config; lr 0 keeps every weight exactly where it started."""
    cfg = json.loads((REPO / "ds_configs/test-1m.json").read_text())
    cfg["optimizer"]["params"]["lr"] = lr
    cfg["bf16"] = {"enabled": bf16}
    cfg["zero_optimization"] = {"stage": zero}
    if bf16 and zero:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}  # DeepSpeed's BF16_Optimizer over ZeRO-1
    path = folder / f"ds-lr{lr}-bf16{int(bf16)}-z{zero}.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, cache_dir, text_corpus):
    out = tmp_path_factory.mktemp("init-source") / "run"
    # Its own seed: the runs started from it (default seed) would otherwise begin at its initial
    # weights, which two steps barely move, and a lost load could pass unnoticed.
    done = run_pretrain(_args(out, "--emulate", "--stages", "2", "--method", "bp", "--deepspeed_config",
                              "ds_configs/test-1m.json", "--steps", "2", "--seed", "7", "--data", str(text_corpus)),
                        None, cache_dir)
    assert done.returncode == 0, launch_failure(done)
    return out


@pytest.fixture(scope="module")
def run_config(source_run):
    """The run's model: test-1m with the char tokenizer's vocabulary."""
    return load_model_spec(source_run / MODEL_CONFIG)


def _hf_model(config, seed=123):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)  # not bll-ds's per-layer seeds: the weights differ from a fresh run's
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def hf_folder(run_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("init-hf") / "llama"
    _hf_model(run_config).save_pretrained(folder)
    return folder


def _hf_state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def _emulator(config, tmp_path, stages=2, bf16=False, lr=0.0):
    ds = load_ds_config(str(_ds_config(tmp_path, lr=lr, bf16=bf16)), stages, stages, 1)
    return EmulatedPipeline("bp", config, stages, ds, seed=0, bll=BLLConfig())


def _emulator_weights(engine) -> dict[str, torch.Tensor]:
    """HF name -> weight, over every stage."""
    return {layer.hf_key(k): v for stage in engine.stages for layer in stage.module.layers
            for k, v in layer.state_dict().items()}


def _checkpointed(run_dir, config) -> dict[str, torch.Tensor]:
    """HF name -> weight, from the run's last checkpoint's DeepSpeed layer files."""
    from bll_ds.modeling.pipeline import build_sequential

    tag = (checkpoints(run_dir) / "latest").read_text().strip()
    out = {}
    for index, layer in enumerate(build_sequential(config, seed=0)):
        state = torch.load(checkpoints(run_dir) / tag / layer_weights(index), map_location="cpu", weights_only=True)
        out.update({layer.hf_key(k): v for k, v in state.items()})
    return out


def _assert_same(ours: dict, reference: dict, dtype=torch.float32):
    assert set(ours) <= set(reference)
    for name, value in ours.items():
        assert torch.equal(value.float(), reference[name].to(dtype).float()), name


# ---- load_into, in this process --------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_an_emulator_takes_the_folders_weights(layout, run_config, tmp_path):
    model = _hf_model(run_config)
    folder = tmp_path / "hf"
    if layout == "sharded":
        model.save_pretrained(folder, max_shard_size="300KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(folder)
    if layout == "bin":
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    engine = _emulator(run_config, tmp_path)
    info = load_into(engine, str(folder), run_config)
    assert info["kind"] == "huggingface" and info["layers"] == list(range(run_config.num_hidden_layers + 2))
    ours = _emulator_weights(engine)
    assert info["tensors"] == len(ours)
    _assert_same(ours, model.state_dict())


def test_a_bf16_emulator_also_sets_its_fp32_masters(run_config, hf_folder, tmp_path):
    """A bf16 stage keeps fp32 copies for its optimizer: they take the folder's exact values,
    and a zero-learning-rate step leaves the bf16 weights at their rounding."""
    reference = _hf_state(hf_folder)
    engine = _emulator(run_config, tmp_path, bf16=True)
    load_into(engine, str(hf_folder), run_config)
    for stage in engine.stages:
        names = {id(p): layer.hf_key(k) for layer in stage.module.layers for k, p in layer.named_parameters()}
        for param, master in zip(stage.params, stage.masters):
            assert master.dtype == torch.float32 and torch.equal(master, reference[names[id(param)]])

    def batch(step, m, micro_batches):
        x = torch.randint(0, run_config.vocab_size, (2, int(SEQ)), generator=torch.Generator().manual_seed(m))
        return x, x.roll(-1, 1)

    engine.start_feedback(0)
    engine.train_steps(0, 1, batch)
    _assert_same(_emulator_weights(engine), reference, torch.bfloat16)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_tied_head_starts_as_the_embedding(family, tmp_path):
    """Folders that tie the LM head store it once; the run's own (untied) head copies it."""
    from transformers import GPT2Config, LlamaConfig

    spec = {"vocab_size": 40, "tie_word_embeddings": False}
    if family == "llama":
        spec.update(json.loads((REPO / "models/test-1m.json").read_text()), vocab_size=40)
        tied = LlamaConfig(**{**spec, "tie_word_embeddings": True})
    else:
        spec.update(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
        tied = GPT2Config(**{**spec, "tie_word_embeddings": True})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    config = load_model_spec(tmp_path / "spec.json")
    model = _hf_model(tied)
    model.save_pretrained(tmp_path / "hf")
    engine = _emulator(config, tmp_path)
    info = load_into(engine, str(tmp_path / "hf"), config)
    assert info["tied_embeddings"] is True
    ours = _emulator_weights(engine)
    embedding = "model.embed_tokens.weight" if family == "llama" else "transformer.wte.weight"
    assert torch.equal(ours["lm_head.weight"], model.state_dict()[embedding])
    _assert_same({k: v for k, v in ours.items() if k != "lm_head.weight"}, model.state_dict())


def test_a_run_dir_gives_its_latest_checkpoint(run_config, source_run, tmp_path):
    engine = _emulator(run_config, tmp_path, stages=4)  # another stage count than the source's
    info = load_into(engine, str(source_run), run_config)
    assert (info["kind"], info["step"]) == ("run", 2)
    _assert_same(_emulator_weights(engine), _checkpointed(source_run, run_config))


@pytest.mark.parametrize("field,value", [("hidden_size", 64), ("num_hidden_layers", 2), ("vocab_size", 300),
                                         ("rope_theta", 500000.0)])
def test_a_different_model_is_refused_naming_the_field(field, value, run_config, tmp_path):
    other = run_config.to_dict()
    other[field] = value
    if field == "hidden_size":
        other["head_dim"] = value // other["num_attention_heads"]
    if field == "rope_theta":
        other["rope_parameters"] = {**other["rope_parameters"], "rope_theta": value}
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(other))
    engine = _emulator(run_config, tmp_path)
    with pytest.raises(UserError) as err:
        load_into(engine, str(tmp_path / "hf"), run_config)
    name = "rope_parameters" if field == "rope_theta" else field
    assert f"its {name} is" in err.value.problem and "--model" in err.value.fix
    if field == "vocab_size":
        assert "--tokenizer" in err.value.fix


def test_a_folder_without_weights_or_config_is_refused(run_config, tmp_path):
    engine = _emulator(run_config, tmp_path)
    with pytest.raises(UserError, match="neither a Hugging Face model folder"):
        load_into(engine, str(tmp_path), run_config)
    (tmp_path / "config.json").write_text(run_config.to_json_string())
    with pytest.raises(UserError, match="no weights"):
        load_into(engine, str(tmp_path), run_config)


# ---- through the trainer ---------------------------------------------------------------------------

def test_an_emulated_run_from_a_folder_checkpoints_its_weights(hf_folder, run_config, tmp_path, cache_dir,
                                                               text_corpus):
    out = tmp_path / "run"
    done = run_pretrain(_args(out, "--emulate", "--stages", "2", "--method", "bll", "--bll_variant", "prototype",
                              "--deepspeed_config", str(_ds_config(tmp_path)), "--steps", "1",
                              "--data", str(text_corpus), "--init_from", str(hf_folder)), None, cache_dir)
    assert done.returncode == 0, launch_failure(done)
    assert "init_from" in done.stdout
    _assert_same(_checkpointed(out, run_config), _hf_state(hf_folder))


@pytest.mark.launcher
def test_a_launched_bf16_zero1_run_from_a_run_dir_checkpoints_its_weights(source_run, run_config, tmp_path,
                                                                          cache_dir, text_corpus):
    """Two launched stages (the second starts at a later layer index) under DeepSpeed's
    BF16_Optimizer over ZeRO-1: the fp32 masters must hold the loaded weights."""
    out = tmp_path / "run"
    done = run_pretrain(_args(out, "--stages", "2", "--method", "bp", "--steps", "1", "--data", str(text_corpus),
                              "--deepspeed_config", str(_ds_config(tmp_path, bf16=True, zero=1)),
                              "--init_from", str(source_run)), 2, cache_dir, master_port=29741)
    assert done.returncode == 0, launch_failure(done)
    _assert_same(_checkpointed(out, run_config), _checkpointed(source_run, run_config), torch.bfloat16)


def test_the_trainer_refuses_a_different_model_in_one_line(tmp_path, run_config, cache_dir, text_corpus):
    folder = tmp_path / "hf"
    other = load_model_spec(REPO / "models/test-1m.json", vocab_size=run_config.vocab_size + 1)
    _hf_model(other).save_pretrained(folder)
    out = tmp_path / "run"
    done = run_pretrain(_args(out, "--emulate", "--stages", "2", "--method", "bp", "--deepspeed_config",
                              "ds_configs/test-1m.json", "--steps", "1", "--data", str(text_corpus),
                              "--init_from", str(folder)), None, cache_dir)
    assert done.returncode == 2, launch_failure(done)
    errors = [line for line in done.stderr.splitlines() if line.startswith("bll-ds: error:")]
    assert len(errors) == 1 and "its vocab_size is" in errors[0] and "Fix:" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and not out.exists()
