"""Direct feedback (bll_ds/method/direct.py): who sends to whom, the readout (prototype's, of the
last stage's table through the stage's own g_k), and what is not modelled. The launched run at
S = 3 (the last stage's tables to both stages, exact resume, equal to the emulator) is in
tests/test_emulator.py."""

import pytest
import torch
from helpers import TINY_HIDDEN, TINY_VOCAB, tiny_model_config

from bll_ds.measure.flops import stage_flop_split
from bll_ds.method.feedback import build_feedback
from bll_ds.method.variants import get as get_variant

V, H = TINY_VOCAB, TINY_HIDDEN


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


def test_every_table_comes_from_the_last_stage():
    direct, chain = get_variant("direct"), get_variant("prototype")
    assert [direct.message_source(k, 4) for k in range(4)] == [3, 3, 3, None]
    assert [direct.message_destinations(k, 4) for k in range(4)] == [[], [], [], [0, 1, 2]]
    assert [chain.message_source(k, 4) for k in range(4)] == [1, 2, 3, None]
    assert [chain.message_destinations(k, 4) for k in range(4)] == [[], [0], [1], [2]]
    assert get_variant("direct-context").message_source(0, 4) == 3


def test_the_readout_maps_the_last_stages_table_through_the_stages_own_g(config):
    torch.manual_seed(0)
    block = build_feedback("direct", config)
    head = torch.randn(V, H)
    block.variant.receive(block, block.variant.compose_message(head, []))
    assert torch.equal(block.targets(), head)  # g_k starts as the identity (its output layer is zero)
    with torch.no_grad():
        block.g.down.weight.normal_()
    block.prepare(head)
    assert torch.allclose(block.targets(), block.g(head))


def test_costs_are_prototypes_and_the_planner_says_not_modelled(config):
    assert stage_flop_split(config, 3, 6, "bll", "direct") == stage_flop_split(config, 3, 6, "bll", "prototype")
    assert get_variant("direct").readout_saved_bytes_per_token(config, 4, 0) is None
    assert get_variant("direct:dim=4:table=bf16:refresh=2").options.refresh == 2


def test_the_simulator_waits_on_the_last_stages_table():
    """On a slow table link, stage 0 waits for the last stage's table under direct feedback (its
    source is S - 1 micro-batches behind) where through the chain it waits on stage 1 only."""
    from bll_bench.simulate import Link, StageCosts, simulate

    stages, micro_batches = 4, 2
    costs = StageCosts(fwd=[1.0] * stages, local=[2.0] * stages, opt=[0.5] * stages)
    chain = Link(table_bytes=1.0, bandwidth_bytes_per_s=1 / 20.0)
    direct = Link(table_bytes=1.0, bandwidth_bytes_per_s=1 / 20.0, tables_from_last=True)
    times = {name: simulate("bll", costs, link, micro_batches=micro_batches, steps=6).step_time_s
             for name, link in (("chain", chain), ("direct", direct))}
    assert times["direct"] > times["chain"]
