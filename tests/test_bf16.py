"""bf16 through the launcher: DeepSpeed's BF16_Optimizer against the emulator and against fp32.

Every GPU run is bf16, and the development CPUs compute it in software, so these runs are tiny
(test-1m shrunk to width 32 and a 16-token context, 2 micro-batches of 2, 20 steps) with
`"bf16": {"enabled": true}` forced. Per variant family, three runs from the same seed:
launched bf16, emulated bf16 (--emulate) and emulated fp32. The fp32 reference is the emulated
one because tests/test_emulator.py holds launched fp32 to emulated fp32 at 1e-4, far inside the
bf16 tolerance below; it saves a launch per family.

Tolerances, from bf16's precision. bf16 keeps 8 significant bits: one rounding moves a value by
at most u = 2^-9 (0.195%) of itself.
- launched bf16 against emulated bf16: within u/8 = 2.4e-4 relative, per stage and step. The
  emulator performs DeepSpeed's rounding steps in the same order (bf16 weights and activations,
  gradients added into the accumulation dtype after each backward, rounded to the all-reduce
  dtype, their norm summed parameter group by group, clipped, fp32 masters; with the groups
  summed in parameter order instead, a one-bit difference in the clipping norm grew to 1.2e-3
  by step 20 here), so the two can differ only where a kernel sums in another
  order (the emulator runs every core's threads, a launched rank one): a fraction of one
  rounding. Measured: bit for bit here; over 200 steps of nanogpt-char
  (scripts/precision/bf16_launched_vs_emulated.sh) 1.5e-4 at S = 2 and 5.0e-4 at S = 4, all of
  it from the thread count (with BLL_DS_THREADS=1 the S = 4 run is bit for bit). The old fault, which zeroed the readout's
  gradients on non-last stages, put stage 0's worst step 1.7% to 22% off in the three CI cases.
- launched bf16 against fp32: every per-stage loss within 4u = 0.78% relative on every step.
  Rounding the weights, activations and logits to bf16 moves a loss by a few u; over 20 steps
  the trajectories drift apart by little more (measured over 30 steps for 8 variants and
  backprop: worst 1.6u on one step; 0.004u to 0.24u averaged over the last 10 steps).

After the first step, every trainable parameter of every stage has moved, elementwise exactly
where the emulator's moved. The check reads the fp32 masters in the optimizer state, not the
bf16 weights (a weight of 1.0 does not round to a new bf16 value after a 3e-3 step up): AdamW's
first step moves a master by about lr wherever its gradient is non-zero and not at all where it
is zero (weight decay is off here). Two kinds must stay: embedding rows of tokens absent from
the step's inputs, and a feedback network's first layer, whose gradient is exactly zero on
step 1 because its output layer starts at zero (bll_ds/method/feedback.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, launch_failure, run_pretrain, stage_losses

from bll_ds.method.variants import get as get_variant
from bll_ds.modeling import load_model_spec
from bll_ds.modeling.pipeline import build_sequential, stage_layer_ranges
from bll_ds.pipeline.build import build_stage_feedback
from bll_ds.pipeline.emulated.emulator import EMULATOR_STATE
from bll_ds.run import run_dir as names

STEPS, SEED = 20, 1234
U = 2.0 ** -9                 # bf16's unit roundoff
FP32_TOLERANCE = 4 * U        # launched bf16 against fp32, per stage and step
EMULATOR_TOLERANCE = U / 8    # launched bf16 against emulated bf16
STILL_ON_STEP_ONE = ("bll_feedback.g.up.",)  # zero gradient by construction (g.down starts at zero)

# (method, variant, stages, bf16 optimizer) -> master port. "zero0": bf16 gradient accumulation
# (nanogpt-char's configs); "zero1": ZeRO-1 with fp32 accumulation (the llama configs, the GPU
# path). CI runs one family of each kind of readout and backprop; the other variants repeat a
# covered family (`make test-all`).
CASES = {("bll", "dgl-context", 2, "zero0"): 29731, ("bll", "prototype", 4, "zero1"): 29732,
         ("bll", "bernoulli", 2, "zero0"): 29733, ("bp", None, 2, "zero1"): 29734,
         ("bll", "drtp", 2, "zero0"): 29735, ("bll", "prototype-aux", 2, "zero1"): 29736,
         ("bll", "dgl-overlap", 2, "zero0"): 29737, ("bll", "gaussian", 2, "zero1"): 29738,
         ("bll", "dgl-context", 4, "zero1"): 29739, ("bp", None, 2, "zero0"): 29740}
IN_CI = list(CASES)[:4]


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("bf16-configs")
    spec = json.loads((REPO / "models/test-1m.json").read_text())
    spec.update(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                max_position_embeddings=16)
    (folder / "model.json").write_text(json.dumps(spec))
    paths = {"model": folder / "model.json"}
    ds = json.loads((REPO / "ds_configs/test-1m.json").read_text())
    ds.pop("scheduler")  # lr 3e-3 from step 1: the first step must move the weights
    ds["optimizer"]["params"]["weight_decay"] = 0.0  # a zero gradient leaves its weight where it was
    bf16_zero1 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                  "data_types": {"grad_accum_dtype": "fp32"}}
    for name, changes in (("fp32", {"bf16": {"enabled": False}}), ("zero0", {"bf16": {"enabled": True}}),
                          ("zero1", bf16_zero1)):
        paths[name] = folder / f"ds-{name}.json"
        paths[name].write_text(json.dumps({**ds, **changes}))
    return paths


def _args(configs, config, method, variant, stages, out) -> list[str]:
    args = ["--model", str(configs["model"]), "--deepspeed_config", str(configs[config]),
            "--tokenizer", "char", "--steps", str(STEPS), "--stages", str(stages), "--method", method,
            "--seed", str(SEED), "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2",
            "--save_interval", "1", "--keep_checkpoints", "0", "--no-measure_matmul_peak", "--out", str(out),
            # Per-token readouts in 4 sequence slices: the sliced backward runs under bf16 too.
            "--bll_readout_max_logits_mb", "0.002"]
    return args + (["--bll_variant", variant] if variant else [])


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _initial_masters(run_dir: Path, variant: str | None, stages: int) -> list[dict[str, torch.Tensor]]:
    """Per stage, its trainable parameters before step 1 in the stage's parameter order, named
    layer{i}.* and bll_feedback.*, as fp32 copies of their bf16 roundings: the masters
    DeepSpeed's BF16_Optimizer (and the emulator) start from."""
    config = load_model_spec(run_dir / names.MODEL_CONFIG)
    layers = build_sequential(config, SEED)
    masters = []
    for k, indices in enumerate(stage_layer_ranges(config, stages)):
        modules = {f"layer{i}.": layers[i] for i in indices}
        feedback = build_stage_feedback(get_variant(variant), config, k, stages, SEED) if variant else None
        if feedback is not None:
            modules["bll_feedback."] = feedback
        masters.append({prefix + key: p.detach().to(torch.bfloat16).float()
                        for prefix, module in modules.items() for key, p in module.named_parameters()
                        if p.requires_grad})
    return masters


def _launched_masters(run_dir: Path, step: int, initial: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Each stage's fp32 masters from DeepSpeed's bf16 optimizer state (one replica: the whole
    flat group is this rank's partition; param_slice_mappings names each parameter's slice)."""
    folder = names.checkpoints(run_dir) / names.checkpoint_tag(step)
    masters = []
    for k, shapes in enumerate(initial):
        state = torch.load(folder / f"bf16_zero_pp_rank_0_mp_rank_{k:02d}_optim_states.pt", weights_only=False,
                           map_location="cpu")["optimizer_state_dict"]
        stage = {}
        for flat, slices in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for ds_name, where in slices.items():
                name = ds_name if ds_name.startswith("bll_feedback.") else "layer" + ds_name
                stage[name] = flat[where.start:where.start + where.numel].view(shapes[name].shape)
        masters.append(stage)
    return masters


def _emulated_masters(run_dir: Path, step: int, initial: list[dict]) -> list[dict[str, torch.Tensor]]:
    """Each emulated stage's fp32 masters (saved in the stage's parameter order)."""
    folder = names.checkpoints(run_dir) / names.checkpoint_tag(step)
    state = torch.load(folder / EMULATOR_STATE, weights_only=False, map_location="cpu")
    return [dict(zip(shapes, stage["masters"], strict=True)) for shapes, stage in zip(initial, state["stages"])]


@pytest.mark.launcher
@pytest.mark.parametrize("method,variant,stages,optimizer",
                         [key if key in IN_CI else pytest.param(*key, marks=pytest.mark.slow) for key in CASES])
def test_launched_bf16_follows_fp32_and_the_emulator_and_moves_every_trained_weight(
        method, variant, stages, optimizer, configs, tmp_path, cache_dir, text_corpus):
    runs = {}
    for name, config, ranks in (("launched", optimizer, stages), ("emulated", optimizer, None),
                                ("fp32", "fp32", None)):
        runs[name] = tmp_path / name
        args = _args(configs, config, method, variant, stages, runs[name]) + ["--data", str(text_corpus)]
        result = run_pretrain(args + ([] if ranks else ["--emulate"]), ranks, cache_dir,
                              master_port=CASES[(method, variant, stages, optimizer)] if ranks else None)
        assert result.returncode == 0, launch_failure(result)

    losses = {name: stage_losses(run, stages) for name, run in runs.items()}
    assert set(losses["launched"]) == set(losses["emulated"]) == set(losses["fp32"])
    assert len(losses["launched"]) == stages * STEPS
    for reference, tolerance in (("emulated", EMULATOR_TOLERANCE), ("fp32", FP32_TOLERANCE)):
        worst = max(losses["launched"], key=lambda key: _relative(losses["launched"][key], losses[reference][key]))
        gap = _relative(losses["launched"][worst], losses[reference][worst])
        assert gap <= tolerance, (f"stage {worst[0]}'s loss at step {worst[1]}: launched bf16 "
                                  f"{losses['launched'][worst]:.5f}, {reference} {losses[reference][worst]:.5f}")

    initial = _initial_masters(runs["launched"], variant if method == "bll" else None, stages)
    launched, emulated = _launched_masters(runs["launched"], 1, initial), _emulated_masters(runs["emulated"], 1, initial)
    for k, start in enumerate(initial):
        assert set(launched[k]) == set(start), f"stage {k}: {sorted(set(launched[k]) ^ set(start))}"
        for key, before in start.items():
            mask = launched[k][key] != before
            where = f"stage {k}'s {key}"
            assert torch.equal(mask, emulated[k][key] != before), f"{where} moved elsewhere than the emulator's"
            if key.endswith(("embed_tokens.weight", "wte.weight")):
                rows = mask.any(dim=1)
                assert rows.any() and not rows.all(), f"{where}: rows of tokens absent from step 1 must stay"
            elif key.startswith(STILL_ON_STEP_ONE):
                assert not mask.any(), f"{where} moved on step 1, where its gradient is zero"
            else:
                assert mask.any(), f"{where} did not move on step 1"
