"""The stitched pipeline model is the HF model: same logits, causal, HF-initialised."""

import math

import pytest
import torch
from deepspeed.runtime import utils as ds_utils
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from bll_ds.infra.errors import UserError
from bll_ds.modeling import (build_sequential, check_stages, count_parameters, load_hf_state_dict,
                             load_model_spec, stage_layer_counts, to_hf_state_dict)
from bll_ds.modeling.layers import DecoderLayer

FAMILIES = [("models/nanogpt-char.json", GPT2LMHeadModel), ("models/test-1m.json", LlamaForCausalLM)]


@pytest.mark.parametrize("spec,hf_class", FAMILIES)
def test_stitched_logits_equal_hf_logits(repo, spec, hf_class):
    config = load_model_spec(repo / spec, vocab_size=97)
    torch.manual_seed(0)
    hf_model = hf_class(config).eval()
    layers = build_sequential(config, seed=1).eval()
    assert set(to_hf_state_dict(layers)) == set(hf_model.state_dict())
    load_hf_state_dict(layers, hf_model.state_dict())
    ids = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        ours, theirs = layers(ids), hf_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # And the other way round: our weights exported to HF give HF the same logits.
    hf_model.load_state_dict(to_hf_state_dict(build_sequential(config, seed=2)))
    with torch.no_grad():
        torch.testing.assert_close(build_sequential(config, seed=2)(ids), hf_model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec,_", FAMILIES)
def test_no_position_sees_the_future(repo, spec, _):
    config = load_model_spec(repo / spec, vocab_size=50)
    layers = build_sequential(config, seed=0)
    hidden = layers[0](torch.randint(0, 50, (2, 24))).detach().requires_grad_(True)
    out = hidden
    for layer in layers[1:]:
        out = layer(out)
    t = 9
    out[:, t].sum().backward()
    assert hidden.grad[:, t + 1:].abs().max().item() == 0.0
    assert hidden.grad[:, :t + 1].abs().max().item() > 0.0


def test_decoder_layer_refuses_a_non_causal_attention_path(repo):
    config = load_model_spec(repo / "models/test-1m.json")
    config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="sdpa"):
        DecoderLayer(config, 0)


def test_initialisation_follows_hf(repo):
    config = load_model_spec(repo / "models/nanogpt-char.json", vocab_size=65)
    layers = build_sequential(config, seed=0)
    block = layers[1].block
    residual_std = config.initializer_range / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(config.initializer_range, rel=0.1)
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.attn.c_attn.bias == 0)
    assert layers[0].wte.weight.std().item() == pytest.approx(config.initializer_range, rel=0.1)


def test_weights_depend_only_on_seed_and_layer_index(repo):
    config = load_model_spec(repo / "models/test-1m.json", vocab_size=64)
    a, b, c = (build_sequential(config, seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.block.self_attn.q_proj.weight"], c["1.block.self_attn.q_proj.weight"])


def test_parameter_count_matches_hf(repo):
    config = load_model_spec(repo / "models/test-1m.json", vocab_size=300)
    assert count_parameters(config) == sum(p.numel() for p in LlamaForCausalLM(config).parameters())


@pytest.mark.parametrize("layers,stages", [(4, 1), (4, 2), (4, 4), (6, 4), (7, 3), (16, 8)])
def test_stage_balance_matches_deepspeed_partition(repo, layers, stages):
    config = load_model_spec(repo / "models/test-1m.json")
    config.num_hidden_layers = layers
    counts = stage_layer_counts(config, stages)
    assert sum(counts) == layers and max(counts) - min(counts) <= 1
    # DeepSpeed's "type:DecoderLayer" partition: balance a 0/1 weight per layer.
    weights = [0] + [1] * layers + [0]
    bounds = ds_utils.partition_balanced(weights=weights, num_parts=stages)
    assert counts == [sum(weights[bounds[s]:bounds[s + 1]]) for s in range(stages)]


def test_a_model_with_fewer_layers_than_stages_is_refused(repo):
    config = load_model_spec(repo / "models/test-1m.json")
    with pytest.raises(UserError, match="cannot be cut into 5 stages"):
        check_stages(config, 5)


def test_spec_errors_name_the_fix(tmp_path, repo):
    with pytest.raises(UserError, match="does not exist"):
        load_model_spec(tmp_path / "nope.json")
    (tmp_path / "bert.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="model_type='bert'"):
        load_model_spec(tmp_path / "bert.json")
    (tmp_path / "tied.json").write_text((repo / "models/test-1m.json").read_text()
                                        .replace('"tie_word_embeddings": false', '"tie_word_embeddings": true'))
    with pytest.raises(UserError, match="tie_word_embeddings"):
        load_model_spec(tmp_path / "tied.json")


def test_named_specs_have_the_documented_sizes(repo):
    sizes = {name: count_parameters(load_model_spec(repo / f"models/{name}.json"))
             for name in ("test-1m", "nanogpt-char", "llama-25m", "llama-125m", "llama-1b", "llama-7b")}
    assert 0.5e6 < sizes["test-1m"] < 1.5e6
    assert 0.7e6 < sizes["nanogpt-char"] < 0.9e6
    assert 20e6 < sizes["llama-25m"] < 30e6
    assert 110e6 < sizes["llama-125m"] < 140e6
    assert 0.9e9 < sizes["llama-1b"] < 1.3e9
    assert 6.5e9 < sizes["llama-7b"] < 7.0e9
