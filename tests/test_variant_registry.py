"""A new local loss is one class in one file: this file defines a throwaway variant, and the CLI,
the builder, the FLOPs model, the memory planner and a launched 2-stage run all find it.

The launched ranks import this very file with --custom_import (bll_ds/method/variants.py)."""

import json
import textwrap
from pathlib import Path

import pytest
import torch.nn.functional as F
from torch import nn

from bll_ds.method import variants
from bll_ds.method.feedback import StageFeedback, build_feedback

THIS_FILE = str(Path(__file__).resolve())


@variants.register
class BottleneckHeadFeedback(StageFeedback):
    """Throwaway: a free low-rank local readout norm(h) -> R^RANK -> V, no feedback tables."""

    name = "test-bottleneck"
    per_token_readout = True
    RANK = 8

    def __init__(self, config, options):
        super().__init__(config, options)
        self.down = nn.Linear(config.hidden_size, self.RANK, bias=False)
        self.up = nn.Linear(self.RANK, config.vocab_size, bias=False)

    @classmethod
    def readout_flops_per_token(cls, options, config, micro_batch_tokens=None):
        """Two trained products, each forward + grad of input + grad of weight."""
        return 6.0 * cls.RANK * (config.hidden_size + config.vocab_size)

    def local_loss(self, hidden, labels):
        logits = self.up(self.down(self.norm(hidden))).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        return ce, {"ce": ce.detach()}


def _docstring_recipe() -> str:
    """The class in bll_ds/method/variants.py's docstring, as written there (a name, a loss, no cost
    declarations), renamed so that it cannot clash with a user's "mine"."""
    doc = variants.__doc__
    start = doc.index("    @register")
    end = doc.index("\n\n", doc.index("return ce", start))
    return textwrap.dedent(doc[start:end]).replace('"mine"', '"test-minimal"')


exec(_docstring_recipe(), {"register": variants.register, "StageFeedback": StageFeedback, "nn": nn, "F": F})


def test_every_consumer_asks_the_class():
    from bll_bench import memory
    from bll_ds.measure import flops
    from bll_ds.modeling import load_model_spec
    from bll_ds.run.config import parse_run_config

    assert "test-bottleneck" in variants.names() and not variants.get("test-bottleneck").sends_table
    config = load_model_spec("models/test-1m.json", vocab_size=100)
    assert isinstance(build_feedback("test-bottleneck", config), BottleneckHeadFeedback)
    assert flops.readout_flops_per_token(config, "test-bottleneck") == 6.0 * 8 * (config.hidden_size + 100)
    assert flops.feedback_step_flops(config, "test-bottleneck") == 0.0
    assert flops.feedback_parameters(config, "test-bottleneck") == 8 * (config.hidden_size + 100)
    bp, bll = (flops.stage_flops(config, 2, 64, method, "test-bottleneck") for method in ("bp", "bll"))
    assert bll[0] - bp[0] == flops.readout_flops_per_token(config, "test-bottleneck") and bll[1] == bp[1]
    with pytest.raises(ValueError, match="'test-bottleneck' readout are not modelled; plan one of"):
        memory.plan(config, 2, 1, 1, 64, 2, "fp32", 0, "bll", variant="test-bottleneck")
    cfg = parse_run_config(["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o",
                            "--custom_import", THIS_FILE, "--bll_variant", "test-bottleneck"])
    assert cfg.bll.variant == "test-bottleneck" and cfg.custom_import == THIS_FILE
    with pytest.raises(ValueError, match="unknown BLL variant 'nope'"):
        variants.get("nope")


def test_a_variant_needs_a_name_and_one_owner():
    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        variants.register(type("Nameless", (StageFeedback,), {}))
    with pytest.raises(ValueError, match="'prototype' is already registered"):
        variants.register(type("Impostor", (StageFeedback,), {"name": "prototype"}))


def test_a_variant_without_cost_declarations_is_not_modelled_rather_than_a_crash(tmp_path):
    from bll_bench import simulate, variant_costs
    from bll_ds.measure import flops
    from bll_ds.modeling import load_model_spec

    config = load_model_spec("models/test-1m.json", vocab_size=100)
    with pytest.raises(flops.NotModelled, match="'test-minimal' declares no readout FLOPs"):
        flops.stage_flops(config, 2, 64, "bll", "test-minimal")
    assert flops.stage_flops(config, 2, 64, "bp", "test-minimal") == flops.stage_flops(config, 2, 64, "bp")
    row, = variant_costs.variant_costs(config, 64, 64, 4, ["test-minimal"])
    assert row["readout_flops_per_token"] is None and "| test-minimal | not modelled |" in variant_costs.markdown([row])
    assert simulate.main(["project", "--model", "models/test-1m.json", "--variant", "test-minimal",
                          "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "projection.json").exists()


@pytest.mark.parametrize("ranks", [pytest.param(2, marks=pytest.mark.launcher), None], ids=["launched", "emulated"])
def test_the_minimal_recipe_trains_to_its_summary(tmp_path, cache_dir, text_corpus, ranks):
    """The recipe variant through the launcher and the emulator, to the end: its summary is
    written with the FLOP rates null, and one line says why."""
    from helpers import launch_failure, run_pretrain

    out = tmp_path / "run"
    result = run_pretrain(["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json",
                           "--tokenizer", "char", "--seq_len", "64", "--log_interval", "1", "--eval_interval", "0",
                           "--final_eval_batches", "8", "--data", str(text_corpus), "--stages", "2",
                           "--steps", "16", "--bll_steps_per_call", "8", "--seed", "3",
                           "--custom_import", THIS_FILE, "--bll_variant", "test-minimal", "--out", str(out),
                           *(["--emulate"] if ranks is None else [])],
                          ranks, cache_dir, master_port=29742)
    assert result.returncode == 0, launch_failure(result)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bll_variant"] == "test-minimal" and summary["model_gflops_per_s"] is None
    s0, s1 = summary["stages_detail"]
    assert s0["grads_sent"] == s1["grads_received"] == 0 and s1["tables_sent"] == 0  # no tables: none declared
    assert "ce" in s0["local_terms"] and s0["mfu"] is None and s0["bll_overhead_flops_share"] is None
    said = [line for line in (result.stdout + result.stderr).splitlines() if "declares no readout FLOPs" in line]
    assert len(said) == 1, said
    stage0 = [json.loads(line) for line in (out / "metrics_stage0.jsonl").read_text().splitlines()]
    ce = [m["stage/ce"] for m in stage0]
    assert len(ce) == 16 and sum(ce[-3:]) / 3 < sum(ce[:3]) / 3 - 0.3, ce  # stage 0 learns from its own loss
