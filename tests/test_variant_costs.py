"""python -m bll_bench variants: the registry's declared costs, one row per variant."""

import json

import pytest

from bll_bench import variant_costs
from bll_ds.measure.flops import layer_forward_flops
from bll_ds.method import variants
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.modeling import load_model_spec


def test_every_variant_has_its_declared_costs(repo):
    config = load_model_spec(repo / "models/llama-d16.json")
    H, V, T = config.hidden_size, config.vocab_size, 256
    rows = {r["variant"]: r for r in variant_costs.variant_costs(config, seq_len=T, micro_batch_tokens=1024,
                                                                 micro_batches=4)}
    assert tuple(rows) == (*variants.names(), DEFAULT_VARIANT) and rows[DEFAULT_VARIANT]["default"]
    # prototype: 6HV per token, and g_k's 18 V H^2 per step spread over the step's 4 x 1024 tokens.
    assert rows["prototype"]["readout_flops_per_token"] == pytest.approx(6 * H * V + 18 * V * H * H / 4096)
    assert rows["prototype"]["table_bytes_per_step_fp32"] == V * H * 4
    assert rows["prototype"]["table_bytes_per_step_bf16"] == V * H * 2
    assert rows["dgl"]["table_bytes_per_step_fp32"] == 0 and rows["dgl"]["feedback_matrix_parameters"] == V * H
    layer = 3 * layer_forward_flops(config, T)
    assert rows["prototype-aux"]["readout_flops_per_token"] == pytest.approx(
        rows["prototype"]["readout_flops_per_token"] + 3 * layer_forward_flops(config, config.max_position_embeddings))
    assert rows["dgl"]["over_one_layer"] == pytest.approx(6 * H * V / layer)
    assert rows["prototype"]["sliced"] and not rows["prototype-aux"]["sliced"]


def test_the_command_prints_the_table_and_writes_json(repo, tmp_path, capsys):
    out = tmp_path / "costs.json"
    assert variant_costs.main(["--model", str(repo / "models/nanogpt-char-d8.json"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| variant |") and len(printed) == 3 + len(variants.names())
    assert printed[-1].startswith(f"| {DEFAULT_VARIANT} (default) |")
    assert [r["variant"] for r in json.loads(out.read_text())] == [*variants.names(), DEFAULT_VARIANT]


def test_the_default_is_a_feedback_variant_within_its_budget_at_32k(repo):
    """The default's options at a 32k vocabulary, on llama-1b shapes: its extra FLOPs (its readout,
    heads and critic) within 5% of a one-layer stage, its message per hop and step within 1/8 of a
    full fp32 table. And a feedback network supplies its targets: it receives a message."""
    config = load_model_spec(repo / "models/llama-1b.json")
    assert config.vocab_size == 32000
    T = config.max_position_embeddings
    (row,) = variant_costs.variant_costs(config, seq_len=T, micro_batch_tokens=T, micro_batches=8,
                                         specs=[DEFAULT_VARIANT], layers_per_stage=1)
    assert row["over_stage"] <= 0.05 and row["table_over_fp32_full"] <= 1 / 8
    default = variants.get(DEFAULT_VARIANT)
    assert default.trains_input_critic and default.message_shape(config) is not None
