"""The memory planner (bll_bench/memory.py) against measurements on real modules.

The saved-activation formulas are checked with the same meter the engines use (autograd's
saved_tensors_hooks, parameters excluded), on one real decoder layer of each family and on
whole BLL / BP stages built as the pipeline builds them. Small b and T: seconds on one core.
"""

from __future__ import annotations

import json

import pytest
import torch

from bll_bench import memory
from bll_ds.method import variants
from bll_ds.method.default_variant import DEFAULT_VARIANT
from bll_ds.method.feedback import build_feedback
from bll_ds.method.stage_step import StageStep, slices_for
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling import count_parameters, lm_loss, load_model_spec
from bll_ds.modeling.checkpointing import run_layers
from bll_ds.modeling.layers import DecoderLayer
from bll_ds.pipeline.build import build_stage, forward_layers

B, T = 2, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def variant_specs(tmp_path_factory) -> dict:
    """test-1m with grouped-query attention (2 key/value heads for 4 query heads, like llama-1b),
    and nanogpt-char with GPT-2's Python-expression gelu_new."""
    folder = tmp_path_factory.mktemp("specs")
    changes = {"gqa": ("models/test-1m.json", {"num_key_value_heads": 2}),
               "gelu_new": ("models/nanogpt-char.json", {"activation_function": "gelu_new"})}
    paths = {}
    for name, (base, change) in changes.items():
        raw = {**json.loads(open(base).read()), **change}
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(json.dumps(raw))
    return paths


def _close(measured: int, predicted: int, tolerance: float) -> bool:
    return abs(predicted - measured) <= tolerance * measured


@pytest.mark.parametrize("spec,dtype", [("models/test-1m.json", "fp32"), ("models/test-1m.json", "bf16"),
                                        ("models/llama-25m.json", "fp32"), ("models/llama-25m.json", "bf16"),
                                        ("models/nanogpt-char.json", "fp32"), ("gqa", "fp32"),
                                        ("gqa", "bf16"), ("gelu_new", "fp32")])
def test_decoder_layer_formula_matches_saved_tensors(spec, dtype, variant_specs):
    config = load_model_spec(variant_specs.get(spec, spec))
    layer = DecoderLayer(config, 0).to(DTYPES[dtype])
    x = torch.randn(B, T, config.hidden_size, dtype=DTYPES[dtype], requires_grad=True)
    measured = memory.measure_saved_activation_bytes(lambda: layer(x * 1), exclude=layer.parameters())
    e = memory.DTYPE_BYTES[dtype]
    predicted = B * T * memory.decoder_layer_saved_bytes(config, e) + memory.rope_table_bytes(config, T, e)
    assert _close(measured, predicted, 0.05), (measured, predicted)


# (spec, method, stages, stage, dtype, micro_batch_size, readout_max_logits_mb, variant). test-1m's
# logits are 2 x 16 x 256 x 4 bytes = 1/32 MiB per micro-batch of 2: 0.01 MiB gives 4 slices of
# 4 tokens, 0.011 gives 3 uneven slices (6, 5, 5 tokens), 0.005 with b = 1 gives 4 slices;
# nanogpt-char's (V = 65) are 8320 bytes: 0.002 MiB gives 4 slices.
TEST_1M, GPT2 = "models/test-1m.json", "models/nanogpt-char.json"
STAGE_CASES = [
    (TEST_1M, "bll", 4, 0, "fp32", 2, 16, "prototype"), (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "prototype"),
    (TEST_1M, "bll", 4, 1, "bf16", 2, 16, "prototype"), (TEST_1M, "bll", 4, 3, "fp32", 2, 16, "prototype"),
    (TEST_1M, "bll", 4, 0, "fp32", 2, 0.01, "prototype"), (TEST_1M, "bll", 4, 1, "fp32", 2, 0.01, "prototype"),
    (TEST_1M, "bll", 4, 1, "bf16", 2, 0.011, "prototype"), (TEST_1M, "bll", 4, 1, "fp32", 1, 0.005, "prototype"),
    (TEST_1M, "bll", 4, 1, "bf16", 1, 0.005, "prototype"), (TEST_1M, "bll", 4, 1, "fp32", 2, 0.01, "dgl"),
    (TEST_1M, "bll", 4, 2, "bf16", 2, 0.011, "drtp"), (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "drtp"),
    (GPT2, "bll", 4, 1, "fp32", 2, 0.002, "prototype"), (GPT2, "bll", 4, 0, "fp32", 1, 0.002, "dgl"),
    (TEST_1M, "bp", 2, 0, "fp32", 2, 16, "prototype"), (TEST_1M, "bp", 2, 1, "bf16", 2, 16, "prototype"),
    # the readout options of bll_ds/method/variant_options.py, and dgl-context's three heads
    (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "dgl-context"), (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "dgl-context:dim=8:neg=16"),
    (TEST_1M, "bll", 4, 1, "bf16", 2, 16, "prototype:dim=8:neg=16:table=bf16"),
    (TEST_1M, "bll", 4, 1, "fp32", 2, 0.01, "dgl:dim=8"),
    # the critic variants: stage 1 reads through the received critic and trains its own of its
    # input, the last stage trains one beside the LM loss, the first trains none
    (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "critic-context:dim=8:neg=16"),
    (TEST_1M, "bll", 4, 3, "fp32", 2, 16, "critic-context:dim=8:neg=16"),
    (TEST_1M, "bll", 4, 0, "bf16", 2, 16, "critic-context:dim=8:neg=16"),
    (TEST_1M, "bll", 4, 2, "bf16", 1, 16, "critic-context:dim=8:neg=16"),
    (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "critic:dim=8:neg=16"), (TEST_1M, "bll", 4, 1, "bf16", 2, 16, "critic:dim=8"),
    (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "critic:neg=16"), (TEST_1M, "bll", 4, 3, "bf16", 2, 16, "critic"),
    (TEST_1M, "bll", 4, 1, "bf16", 2, 16, "critic-context"), (GPT2, "bll", 4, 1, "fp32", 2, 16, "critic-context"),
    (GPT2, "bll", 4, 3, "fp32", 1, 16, "critic-context:neg=16"),
    (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "critic-context:dim=8:neg=16:table=bf16"),
    (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "critic-context:dim=8:neg=16:extrap=2")]


@pytest.mark.parametrize("spec,method,stages,stage,dtype,b,max_mb,variant", STAGE_CASES)
def test_stage_saved_bytes_match_the_engines_meter(spec, method, stages, stage, dtype, b, max_mb, variant):
    """A stage's micro-batches as the engine runs them, to the byte: BP's forward and loss (all
    it saves); BLL's forward and local backward (sliced as the engine slices it) with the tables
    excluded, against StageMemory.saved_per_micro_batch, and a whole BLL step including
    finish_step, as the engines' meter sees it (weights excluded), against meter_bytes."""
    _check_stage(spec, method, stages, stage, dtype, b, max_mb, variant, interval=0)


# (spec, method, stages, stage, dtype, b, readout_max_logits_mb, variant, interval). test-1m on 2
# stages: stage 0 runs [embedding, D0, D1], stage 1 [D2, D3, head]. Interval 2 cuts them into
# [E, D0] (run as usual) + [D1] and [D2, D3] + [H] (as usual); interval 3 checkpoints nothing.
CHECKPOINT_CASES = [
    (TEST_1M, "bll", 4, 0, "fp32", 2, 16, "prototype", 1), (TEST_1M, "bll", 4, 1, "fp32", 2, 16, "prototype", 1),
    (TEST_1M, "bll", 4, 1, "bf16", 2, 16, "prototype", 1), (TEST_1M, "bll", 4, 3, "fp32", 2, 16, "prototype", 1),
    (TEST_1M, "bll", 4, 1, "fp32", 2, 0.01, "prototype", 1), (TEST_1M, "bll", 4, 1, "bf16", 1, 0.005, "prototype", 1),
    (TEST_1M, "bll", 4, 2, "bf16", 2, 0.011, "drtp", 1), (TEST_1M, "bll", 4, 1, "fp32", 2, 0.01, "dgl", 1),
    (GPT2, "bll", 4, 1, "fp32", 2, 0.002, "prototype", 1), (GPT2, "bll", 4, 0, "fp32", 1, 0.002, "dgl", 1),
    (TEST_1M, "bll", 2, 0, "fp32", 2, 16, "prototype", 2), (TEST_1M, "bll", 2, 1, "fp32", 2, 16, "prototype", 2),
    (TEST_1M, "bll", 2, 0, "bf16", 2, 16, "prototype", 3), (TEST_1M, "bll", 2, 1, "fp32", 2, 16, "prototype", 3),
    (TEST_1M, "bp", 2, 0, "fp32", 2, 16, "prototype", 1), (TEST_1M, "bp", 2, 1, "fp32", 2, 16, "prototype", 1),
    (TEST_1M, "bp", 2, 1, "bf16", 2, 16, "prototype", 1), (TEST_1M, "bp", 2, 0, "bf16", 2, 16, "prototype", 2),
    (TEST_1M, "bp", 2, 1, "fp32", 2, 16, "prototype", 2), (TEST_1M, "bp", 4, 1, "fp32", 2, 16, "prototype", 1),
    (GPT2, "bp", 4, 1, "fp32", 2, 16, "prototype", 1), (GPT2, "bp", 4, 0, "fp32", 1, 16, "prototype", 1)]


@pytest.mark.parametrize("spec,method,stages,stage,dtype,b,max_mb,variant,interval", CHECKPOINT_CASES)
def test_checkpointed_stage_saved_bytes_match_the_meter(spec, method, stages, stage, dtype, b, max_mb, variant,
                                                        interval):
    """The same, with activation checkpointing: the stage's layers run as the emulator runs them
    (run_layers: PipelineModule's groups and the project's checkpoint function). BP is also run
    through its backward, where each checkpointed group's recompute saves its activations again:
    saved_per_micro_batch is that peak, meter_bytes (one micro-batch in flight) the forward's."""
    _check_stage(spec, method, stages, stage, dtype, b, max_mb, variant, interval)


def test_checkpointing_keeps_less_per_micro_batch_and_counts_the_recompute():
    spec, run = "models/llama-7b.json", dict(micro_batch_size=1, seq_len=2048, micro_batches=32, dtype="bf16",
                                              zero_stage=1)
    for method in memory.METHODS:
        off = memory.plan(spec, 8, 1, method=method, **run)
        on = memory.plan(spec, 8, 1, method=method, activation_checkpoint_interval=1, **run)
        for a, b in zip(off, on):
            assert b.checkpointed_groups == a.decoder_layers == 4 and a.checkpointed_groups == 0
            assert b.activation_bytes < a.activation_bytes and b.meter_bytes < a.meter_bytes
            assert b.recompute_bytes > 0 and b.static_bytes == a.static_bytes
    # BP's stage 0 keeps 8 micro-batches, each with its 4 layers' inputs and its output (in
    # pipe_buffers until the gradient comes), [2048, 4096] bf16 each, and the token ids; plus,
    # during one backward, one layer's recomputed activations.
    bp = memory.plan(spec, 8, 1, method="bp", activation_checkpoint_interval=1, **run)[0]
    layer_input = 2048 * 4096 * 2
    assert bp.activation_bytes == 8 * (5 * layer_input + 2048 * 8) + bp.recompute_bytes


def test_bp_stash_in_flight_with_checkpointing_peaks_as_planned():
    """1F1B's stage 0 of 2 (two micro-batches in flight), every layer checkpointed: both forwards,
    then both backwards. The meter's peak is the first backward's worst recompute on top of the
    other micro-batch's stash: the planner's activation_bytes without the pipe buffers (the
    output each micro-batch keeps in pipe_buffers, not a saved tensor), with the recomputed
    layer's rotary tables (counted once in buffer_bytes)."""
    config = load_model_spec(TEST_1M)
    built = build_stage(config, 2, 0)
    layers = [layer for name, layer in built.module.named_children() if name != "bll_feedback"]
    inputs = torch.randint(config.vocab_size, (B, T))

    def one_f_one_b():
        outs = [run_layers(layers, inputs.clone(), 1) for _ in range(2)]  # each its own token ids
        for out in outs:
            out.backward(torch.ones_like(out))
    plan = memory.plan(config, 2, 1, B, T, 4, "fp32", 0, "bp", activation_checkpoint_interval=1)[0]
    assert plan.in_flight == 2
    pipe = plan.in_flight * B * T * config.hidden_size * 4
    assert memory.measure_saved_activation_bytes(one_f_one_b, exclude=built.weights()) \
        == plan.activation_bytes - pipe + memory.rope_table_bytes(config, T, 4)


def _check_stage(spec, method, stages, stage, dtype, b, max_mb, variant, interval):
    config = load_model_spec(spec)
    built = build_stage(config, stages, stage, variant=variant)
    built.module.to(DTYPES[dtype])
    first, last = stage == 0, stage == stages - 1
    n_inputs = (b, T) if first else (b, T, config.hidden_size)
    inputs = torch.randint(config.vocab_size, n_inputs) if first else \
        torch.randn(n_inputs, dtype=DTYPES[dtype], requires_grad=(method == "bp"))
    labels = torch.randint(config.vocab_size, (b, T))
    if ":neg=" in variant:  # distinct targets: the candidates reach the bound the planner declares
        labels = torch.randperm(config.vocab_size)[:b * T].reshape(b, T).clone()  # its own storage, as a batch's
    shape = variants.get(variant).message_shape(config) or (config.vocab_size, config.hidden_size)
    table = torch.randn(shape, dtype=variants.get(variant).message_dtype(DTYPES[dtype]))  # as it travels
    # BP with checkpointing: one micro-batch, so that meter_bytes is one micro-batch's forward
    micro_batches = 1 if method == "bp" and interval else 4
    plan = memory.plan(config, stages, 1, b, T, micro_batches, dtype, 1 if dtype == "bf16" else 0, method,
                       variant=variant, readout_max_logits_mb=max_mb, activation_checkpoint_interval=interval)[stage]
    layers = [layer for name, layer in built.module.named_children() if name != "bll_feedback"]

    def forward(x):
        return run_layers(layers, x, interval) if interval else forward_layers(built, x)
    slices = 1 if last or method == "bp" else slices_for(get_variant(variant), (b, T), config.vocab_size, max_mb)
    assert plan.readout_slices == slices
    assert (slices > 1) == (method == "bll" and not last and max_mb < 1)  # the sliced cases do slice

    if method == "bp":
        def forward_and_loss():
            # DeepSpeed's BP forward runs on a clone of the received input.
            out = forward(inputs if first else inputs.clone())
            return lm_loss(out, labels) if last else out

        def forward_and_backward():
            out = forward_and_loss()
            out.backward(None if last else torch.ones_like(out))
        forward_only = memory.measure_saved_activation_bytes(forward_and_loss, exclude=built.weights())
        if not interval:
            assert forward_only == plan.saved_per_micro_batch
            return
        assert plan.in_flight == 1 and forward_only == plan.meter_bytes
        assert memory.measure_saved_activation_bytes(forward_and_backward, exclude=built.weights()) \
            == plan.saved_per_micro_batch
        return

    # The stage step every driver runs (stage_step.py), as BlockLocalStage calls it: the sliced
    # readout where it slices, the critic of the stage's input where the variant trains one.
    stage_step = StageStep(built.feedback, lm_loss, last, max_mb, get_variant(variant))

    def step(exclude_tables: bool, micro_batches: int = 2):
        weights = built.weights()
        stage_step.begin(table if built.sends_tables else None)
        if exclude_tables and built.sends_tables and not last:
            weights.extend([table, *built.feedback.step_tables()])

        def run():
            for _ in range(micro_batches):
                out = forward(inputs)
                stage_step.local_backward(out, labels, lambda loss, scale: loss.backward(), inputs, layers)
            if not exclude_tables:
                stage_step.finish_feedback(lambda surrogate, scale: surrogate.backward())
        return memory.measure_saved_activation_bytes(run, exclude=weights)

    assert step(exclude_tables=True) == plan.saved_per_micro_batch
    assert step(exclude_tables=False) == plan.meter_bytes


def test_sliced_readout_saves_less_and_the_meter_sees_the_llama_25m_run():
    """The sliced readout's saving, and llama-25m on 2 stages (fp32, b=4, T=256, M=4, ZeRO-1) as
    the launcher's traced run measured it: BLL with --bll_readout_max_logits_mb 4 (4 slices)
    159.67 / 164.66 MiB, BP 288.83 / 166.67 MiB (summary.json activation_peak_mb)."""
    spec, run = "models/llama-25m.json", dict(micro_batch_size=4, seq_len=256, micro_batches=4, dtype="fp32",
                                               zero_stage=1)
    sliced = memory.plan(spec, 2, 1, method="bll", readout_max_logits_mb=4, **run)
    bp = memory.plan(spec, 2, 1, method="bp", **run)
    assert [s.readout_slices for s in sliced] == [4, 1]
    assert [round(s.meter_bytes / memory.MIB, 2) for s in sliced] == [159.67, 164.66]
    assert [round(s.meter_bytes / memory.MIB, 2) for s in bp] == [288.83, 166.67]
    # 16 MiB of logits per micro-batch: the default cap (16) keeps one slice.
    whole = memory.plan(spec, 2, 1, method="bll", **run)
    assert [s.readout_slices for s in whole] == [1, 1]
    assert whole[0].meter_bytes > sliced[0].meter_bytes and whole[1] == sliced[1]
    assert memory.plan(spec, 2, 1, method="bll", readout_max_logits_mb=0, **run) == whole


def test_meter_releases_after_backward_and_counts_storages_once():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    meter = memory.SavedActivationMeter()
    meter.exclude(layer.parameters())
    with meter.hooks():
        y = layer(x)          # saves x
        z = (y * y).sum()     # saves y (twice: one storage)
    assert meter.live_bytes == meter.peak_bytes == 2 * 4 * 8 * 4
    z.backward()
    del y, z
    assert meter.live_bytes == 0
    forward_only = memory.measure_saved_activation_bytes(lambda: (layer(x) ** 2).sum(), exclude=layer.parameters())
    with_backward = memory.measure_saved_activation_bytes(lambda: (layer(x) ** 2).sum().backward(),
                                                          exclude=layer.parameters())
    assert forward_only == with_backward == meter.peak_bytes


def test_parameter_counts_match_real_modules():
    config = load_model_spec("models/test-1m.json")
    assert sum(s.trainable for s in memory.stage_sizes(config, 4, "bp")) == count_parameters(config)
    width = config.hidden_size
    real = sum(p.numel() for p in build_feedback("prototype", config).parameters())  # on the CPU
    assert memory.feedback_size(config, "prototype").trainable == real == 2 * (width * width + width) + width
    bll, bp = memory.stage_sizes(config, 4, "bll"), memory.stage_sizes(config, 4, "bp")
    assert [a.trainable - b.trainable for a, b in zip(bll, bp)] == [real] * 3 + [0]
    drtp = memory.feedback_size(config, "drtp")
    assert drtp.buffers == config.vocab_size * width and drtp.trainable == width


@pytest.mark.parametrize("variant", ["critic-context:dim=8:neg=16", "critic"])
def test_critic_stage_sizes_are_the_built_stages(variant):
    """Under a critic variant the last stage holds a block too, and every stage but the first a
    critic of its input: the plan's parameters are the stages' as the pipeline builds them."""
    config = load_model_spec("models/test-1m.json")
    planned = memory.stage_sizes(config, 4, "bll", variant)
    built = [build_stage(config, 4, stage, variant=variant) for stage in range(4)]
    assert [s.trainable for s in planned] == [sum(p.numel() for p in b.module.parameters()) for b in built]
    assert [s.buffers for s in planned] == [sum(t.numel() for t in b.module.buffers()) for b in built]
    embedding, layer, head = memory.pipeline_piece_sizes(config)
    critic = get_variant(variant).input_critic_parameters(config)  # matrices only: U_k (and Q_k)
    assert planned[1].trainable - layer.trainable - (planned[0].trainable - layer.trainable - embedding.trainable) \
        == critic + config.hidden_size  # stage 1's block is stage 0's plus the critic and its norm's gain


def test_optimizer_precision_and_schedule_accounting():
    spec = "models/test-1m.json"
    bp = memory.plan(spec, 4, 1, 1, 32, 8, "fp32", 0, "bp")
    assert [s.in_flight for s in bp] == [4, 3, 2, 1]
    assert [s.in_flight for s in memory.plan(spec, 4, 1, 1, 32, 2, "fp32", 0, "bp")] == [2, 2, 2, 1]
    assert all(s.in_flight == 1 for s in memory.plan(spec, 4, 1, 1, 32, 8, "fp32", 0, "bll"))
    p = bp[1].params
    assert (bp[1].weight_bytes, bp[1].grad_bytes, bp[1].optimizer_bytes) == (4 * p, 4 * p, 8 * p)
    zero1 = memory.plan(spec, 4, 4, 1, 32, 8, "fp32", 1, "bp")[1]
    assert zero1.optimizer_bytes == 12 * p // 4
    bf16 = memory.plan(spec, 4, 2, 1, 32, 8, "bf16", 1, "bp")[1]
    assert (bf16.weight_bytes, bf16.grad_bytes, bf16.optimizer_bytes) == (2 * p, 6 * p, 12 * p // 2)
    with pytest.raises(ValueError):
        memory.plan(spec, 4, 1, 1, 32, 8, "bf16", 0, "bp")  # DeepSpeed refuses it


def test_cli_plan_clusters_and_rss(tmp_path, capsys):
    assert memory.main(["--model", "models/test-1m.json", "--stages", "2", "--seq_len", "64",
                        "--json", str(tmp_path / "plan.json")]) == 0
    assert "peak" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "plan.json").read_text())) == 2
    answers = memory.write_clusters(tmp_path, models=("models/test-1m.json",), seq_len=64,
                                    sensitivity_micro_batch_sizes=(1, 2))
    assert all(a.best.gpus == 1 for a in answers)  # a 1M model fits one GPU either way
    saved = json.loads((tmp_path / "clusters.json").read_text())
    assert {a["method"] for a in saved["answers"]} == {"bp", "bll"}
    assert "smallest cluster" in (tmp_path / "clusters.md").read_text()
    assert saved["settings"]["variant"] == DEFAULT_VARIANT  # BLL is planned with the default variant
    assert f"BLL: variant {DEFAULT_VARIANT}" in (tmp_path / "clusters.md").read_text()
    assert memory.main(["--model", "models/test-1m.json", "--stages", "2", "--seq_len", "64", "--method", "bp",
                        "--activation_checkpoint_interval", "1"]) == 0
    assert "recompute" in capsys.readouterr().out
    memory.write_clusters(tmp_path / "ckpt", models=("models/test-1m.json",), seq_len=64,
                          sensitivity_micro_batch_sizes=(1,), activation_checkpoint_interval=1)
    assert json.loads((tmp_path / "ckpt" / "clusters.json").read_text())["settings"]["activation_checkpoint_interval"] == 1
    assert "Activation checkpointing in both methods" in (tmp_path / "ckpt" / "clusters.md").read_text()
    stage_plan = memory.plan("models/llama-25m.json", 2, 1, 4, 256, 4, "fp32", 1, "bp")
    rss = memory.predicted_rss_mb("models/llama-25m.json", 2, 1, 4, 256, 4, "fp32", 1, "bp", baseline_mb=100.0)
    assert rss == [100.0 + s.peak_bytes / memory.MIB for s in stage_plan]


def test_the_budget_search_finds_the_largest_micro_batch_that_fits():
    from bll_bench.memory import GIB, max_stage_bytes, plan
    from bll_bench.memory_budget import fits

    budget = GIB
    rows = fits("models/llama-25m.json", 2, budget, 256, 4, "dgl-context:dim=64:neg=2048", vocab_size=4096,
                dtype="fp32", zero_stage=1)
    assert [(f.method, f.activation_checkpoint_interval) for f in rows] == [("bp", 0), ("bp", 1), ("bll", 0),
                                                                            ("bll", 1)]
    for f in rows:
        kwargs = dict(dtype="fp32", zero_stage=1, method=f.method, vocab_size=4096,
                      activation_checkpoint_interval=f.activation_checkpoint_interval,
                      **({"variant": "dgl-context:dim=64:neg=2048"} if f.method == "bll" else {}))
        worst = [max_stage_bytes(plan("models/llama-25m.json", 2, 1, b, 256, 4, **kwargs))
                 for b in (f.micro_batch_size, f.micro_batch_size + 1)]
        assert f.micro_batch_size >= 1 and worst[0] <= budget < worst[1]
    # Checkpointing every layer lets either method take a larger micro-batch.
    by = {(f.method, f.activation_checkpoint_interval): f.micro_batch_size for f in rows}
    assert by[("bp", 1)] > by[("bp", 0)] and by[("bll", 1)] > by[("bll", 0)]
