"""The one-process emulator (--emulate) against the launched pipeline it emulates.

For backprop and for block-local learning (prototype, dgl) at 2 and 4 stages, both train 20 fp32
steps (30 for the runs shared with tests/test_launcher.py) on the same data: every stage's
per-step loss and every final weight must agree to a relative difference of 1e-4. The emulated
run dir must also work with evaluate and resume exactly. The levers against the depth gap
(auxiliary-layer and overlap readouts) are checked the same way, with a launched run that is
killed and resumed.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (LAUNCHED_BLL_ARGS, LAUNCHED_BP_ARGS, LAUNCHED_STEPS, launch_failure, run_pretrain, run_script,
                     stage_losses)

from bll_ds.infra.errors import UserError
from bll_ds.pipeline.emulated.emulated_stage import build_optimizer
from bll_ds.use.trained_run import load_forward_network

STEPS = 20
TOLERANCE = 1e-4
PORTS = {("bp", None, 2): 29681, ("bp", None, 4): 29682, ("bll", "prototype", 2): 29683,
         ("bll", "prototype", 4): 29684, ("bll", "dgl", 2): 29685, ("bll", "dgl", 4): 29686}


def _args(method, variant, stages, out, steps=STEPS, data=None):
    args = ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
            "--tokenizer", "char", "--steps", str(steps), "--seq_len", "32", "--stages", str(stages),
            "--method", method, "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "4",
            "--save_interval", "10", "--no-measure_matmul_peak", "--out", str(out)]
    if data is not None:
        args += ["--data", str(data)]
    return args + (["--bll_variant", variant] if variant else [])


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _worst_weight_difference(run_a, run_b) -> float:
    _, layers_a, _ = load_forward_network(run_a)
    _, layers_b, _ = load_forward_network(run_b)
    worst = 0.0
    for (name, a), (_, b) in zip(layers_a.state_dict().items(), layers_b.state_dict().items()):
        worst = max(worst, float((a - b).norm() / max(float(a.norm()), 1e-12)))
    return worst


# The 2-stage backprop and prototype cases read the launched runs that tests/test_launcher.py
# reads too (conftest: launched_bp_run, launched_bll_run; 30 steps at seq_len 64, 8 block-local
# steps per call); the emulated run takes their arguments.
SHARED = {("bp", None, 2): ("launched_bp_run", LAUNCHED_BP_ARGS),
          ("bll", "prototype", 2): ("launched_bll_run", LAUNCHED_BLL_ARGS)}


@pytest.mark.launcher
# The 4-stage cases are in `make test-all` only (pytest -m slow): the 2-stage ones cover every
# method in CI, and each 4-stage launch costs about 40 s on 2 cores.
@pytest.mark.parametrize("method,variant,stages",
                         [pytest.param(*key, marks=pytest.mark.slow) if key[2] == 4 else key for key in PORTS])
def test_emulator_equals_the_launched_pipeline(method, variant, stages, tmp_path, cache_dir, text_corpus, request):
    emulated = tmp_path / "emulated"
    if (method, variant, stages) in SHARED:
        fixture, args = SHARED[(method, variant, stages)]
        launched, steps = request.getfixturevalue(fixture), LAUNCHED_STEPS
        emulated_args = args + ["--data", str(text_corpus), "--out", str(emulated)]
    else:
        launched, steps = tmp_path / "launched", STEPS
        result = run_pretrain(_args(method, variant, stages, launched, data=text_corpus), ranks=stages,
                              cache_dir=cache_dir, master_port=PORTS[(method, variant, stages)])
        assert result.returncode == 0, launch_failure(result)
        emulated_args = _args(method, variant, stages, emulated, data=text_corpus)
    result = run_pretrain(emulated_args + ["--emulate"], ranks=None, cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)

    losses_l, losses_e = stage_losses(launched, stages), stage_losses(emulated, stages)
    assert set(losses_l) == set(losses_e) and len(losses_l) == stages * steps
    worst_loss = max(_relative(losses_l[key], losses_e[key]) for key in losses_l)
    assert worst_loss <= TOLERANCE, f"per-step losses differ by {worst_loss:.2e} (relative)"
    worst_weight = _worst_weight_difference(launched, emulated)
    assert worst_weight <= TOLERANCE, f"final weights differ by {worst_weight:.2e} (relative norm)"

    summary_l = json.loads((launched / "summary.json").read_text())
    summary_e = json.loads((emulated / "summary.json").read_text())
    assert summary_e["emulated"] and not summary_l["emulated"]
    assert _relative(summary_l["val_loss"], summary_e["val_loss"]) <= TOLERANCE
    # The traffic the launched stages count is the traffic the emulator counts.
    for detail_l, detail_e in zip(summary_l["stages_detail"], summary_e["stages_detail"]):
        for key in ("acts_sent", "grads_sent", "tables_sent", "bytes_down", "bytes_up"):
            assert detail_l[key] == detail_e[key], (detail_l["stage"], key)
    if method == "bll":
        assert all(d["grads_sent"] == 0 for d in summary_e["stages_detail"])


@pytest.mark.launcher
def test_emulated_run_resumes_exactly_and_evaluates(tmp_path, cache_dir, text_corpus, repo):
    """A run killed at step 10 (its checkpoint) and resumed ends where an uninterrupted one does."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--emulate", "--bll_variant", "prototype"]
    result = run_pretrain(_args("bll", None, 4, straight, data=text_corpus) + args, ranks=None, cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)
    result = run_pretrain(_args("bll", None, 4, resumed, data=text_corpus) + args + ["--exit_interval", "10"],
                          ranks=None, cache_dir=cache_dir)
    assert result.returncode == 0 and "continue with --resume" in result.stdout, launch_failure(result)
    result = run_pretrain(_args("bll", None, 4, resumed, data=text_corpus) + args + ["--resume"], ranks=None,
                          cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)
    assert stage_losses(straight, 4) == stage_losses(resumed, 4)
    assert _worst_weight_difference(straight, resumed) == 0.0

    # A launch may not resume an emulated run: its optimizer state is laid out per process.
    result = run_pretrain(_args("bll", None, 4, resumed, steps=30, data=text_corpus) + ["--bll_variant", "prototype",
                          "--resume"], ranks=4, cache_dir=cache_dir, master_port=29687)
    assert result.returncode != 0 and "--emulate" in result.stderr, launch_failure(result)

    # scripts/evaluate.py reads the emulated run as it reads a launched one.
    evaluated = run_script(repo / "scripts" / "evaluate.py", [str(straight), "--batches", "4", "--cache_dir",
                                                              str(cache_dir), "--json", str(tmp_path / "eval.json")],
                           timeout=300)
    assert evaluated.returncode == 0, launch_failure(evaluated)
    summary = json.loads((straight / "summary.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


LEVER_PORTS = {"prototype-aux": 29688, "prototype-overlap": 29689, "dgl-overlap": 29690, "dgl-context": 29691,
               "dgl-context-man": 29694, "prototype-context": 29695, "critic": 29696, "direct": 29697,
               "critic-context-man": 29698, "critic-context:dim=16:neg=20:table=bf16:refresh=2": 29699,
               "critic-context:dim=16:neg=20:labels=0.9:extrap=2": 29766}
SENDS_UPSTREAM = {"prototype-aux": True, "prototype-overlap": True, "dgl-overlap": True, "dgl-context": False,
                  "dgl-context-man": True, "prototype-context": True, "critic": True, "direct": True,
                  "critic-context-man": True, "critic-context:dim=16:neg=20:table=bf16:refresh=2": True,
                  "critic-context:dim=16:neg=20:labels=0.9:extrap=2": True}
LEVER_STAGES = {"direct": 3}  # the others at 2; direct's tables skip a stage only from 3 on
# The rest run in `make test-all`. The critic with every option: the last stage holds a block (its
# critic) and a sampler, checkpointed, and the factored critic travels in bf16 every other step;
# direct: the last stage sends to every stage on groups that are not neighbours'; the extrapolated
# critic: the previous message travels in the block's checkpointed state.
IN_MAKE_TEST = ("prototype-aux", "dgl-context", "critic-context:dim=16:neg=20:table=bf16:refresh=2", "direct",
                "critic-context:dim=16:neg=20:labels=0.9:extrap=2")


@pytest.mark.launcher
# CI keeps the default variant and one lever that sends tables upstream.
@pytest.mark.parametrize("variant", [v if v in IN_MAKE_TEST else pytest.param(v, marks=pytest.mark.slow)
                                     for v in LEVER_PORTS])
def test_lever_launched_killed_and_resumed_equals_emulated(tmp_path, cache_dir, text_corpus, variant):
    """The levers (bll_ds/method/aux_readout.py, overlap.py, context.py) through the launcher, killed at
    step 10 and resumed, end where one straight emulated run does, and no gradient crosses a
    stage. The overlap variants send a layer copy upstream (dgl-overlap: nothing else), through
    the same channel, lag and checkpointed queue as the tables; dgl-context sends nothing."""
    launched, emulated = tmp_path / "launched", tmp_path / "emulated"
    stages = LEVER_STAGES.get(variant, 2)
    args = _args("bll", variant, stages, launched, data=text_corpus)
    port = LEVER_PORTS[variant]
    result = run_pretrain(args + ["--exit_interval", "10"], ranks=stages, cache_dir=cache_dir, master_port=port)
    assert result.returncode == 0 and "continue with --resume" in result.stdout, launch_failure(result)
    result = run_pretrain(args + ["--resume"], ranks=stages, cache_dir=cache_dir, master_port=port)
    assert result.returncode == 0, launch_failure(result)
    result = run_pretrain(_args("bll", variant, stages, emulated, data=text_corpus) + ["--emulate"], ranks=None,
                          cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)
    losses_l, losses_e = stage_losses(launched, stages), stage_losses(emulated, stages)
    assert set(losses_l) == set(losses_e) and len(losses_l) == stages * STEPS
    assert max(_relative(losses_l[key], losses_e[key]) for key in losses_l) <= TOLERANCE
    assert _worst_weight_difference(launched, emulated) <= TOLERANCE
    summary = json.loads((launched / "summary.json").read_text())
    assert all(d["grads_sent"] == 0 for d in summary["stages_detail"])
    assert summary["stages_detail"][0]["tables_sent"] == 0
    assert (summary["stages_detail"][-1]["tables_sent"] > 0) == SENDS_UPSTREAM[variant]
    if variant == "direct":  # the last stage sends P_0 .. P_20 to both stages; the middle one sends none
        sent = [d["tables_sent"] for d in json.loads((emulated / "summary.json").read_text())["stages_detail"]]
        assert sent == [0, 0, 2 * (STEPS + 1)]
        assert summary["stages_detail"][1]["tables_sent"] == 0


def test_emulate_refuses_a_launched_rank(tmp_path, cache_dir, text_corpus):
    result = run_pretrain(_args("bll", "prototype", 2, tmp_path / "run", data=text_corpus) + ["--emulate"],
                          ranks=None, cache_dir=cache_dir, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert result.returncode == 2 and "run it with python, not a launcher" in result.stderr, launch_failure(result)
    assert not (tmp_path / "run").exists()


def test_emulated_optimizer_is_the_one_deepspeed_builds_or_a_clear_error():
    param = torch.nn.Parameter(torch.ones(2, 2))
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}}}
    optimizer = build_optimizer([{"params": [param]}], config)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.1
    with pytest.raises(UserError, match="torch_adam"):
        build_optimizer([{"params": [param]}], {"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}})
