"""Direct feedback (bll_ds/method/direct.py): who sends to whom, the readout (prototype's, of the
last stage's table through the stage's own g_k), and what is not modelled. The launched run at
S = 3 (the last stage's tables to both stages, exact resume, equal to the emulator) is in
tests/test_emulator.py."""

import pytest
import torch
from helpers import TINY_HIDDEN, TINY_VOCAB, tiny_model_config

from bll_ds.measure.flops import NotModelled, stage_flop_split
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


def test_costs_are_prototypes_and_the_planner_and_simulator_say_not_modelled(config):
    assert stage_flop_split(config, 3, 6, "bll", "direct") == stage_flop_split(config, 3, 6, "bll", "prototype")
    assert get_variant("direct").readout_saved_bytes_per_token(config, 4, 0) is None
    from bll_bench.simulate import layer_costs_from_flops
    with pytest.raises(NotModelled, match="last stage"):
        layer_costs_from_flops(config, 6, 1, 1e12, variant="direct")
    assert get_variant("direct:dim=4:table=bf16:refresh=2").options.refresh == 2
