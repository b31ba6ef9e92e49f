"""Downstream-trained feedback (bll_ds/method/critic.py): the critic's loss by hand, which stages
hold a critic and a block, that the critic's loss trains the critic alone, that the stage's readout
scores against the received critic without training it, and the declared costs. The launched run
(exact resume, no cross-stage gradient, the last stage's block checkpointed) is in
tests/test_emulator.py."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_HIDDEN, TINY_SEQ, TINY_VOCAB, tiny_model_config

from bll_ds.measure.flops import stage_flop_split
from bll_ds.method.critic import critic_loss
from bll_ds.method.stage_step import StageStep
from bll_ds.method.variants import get as get_variant
from bll_ds.modeling import lm_loss
from bll_ds.pipeline.build import build_stage

T, V, H = TINY_SEQ, TINY_VOCAB, TINY_HIDDEN


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


def test_critic_loss_by_hand():
    torch.manual_seed(0)
    logits, prediction = torch.randn(2, T, V), torch.randn(2, T, V)
    labels = torch.randint(0, V, (2, T))
    labels[0, 0] = -100
    a = 0.3
    loss, terms = critic_loss(logits, prediction, labels, a)
    valid = labels != -100
    log_q, p = F.log_softmax(logits, -1)[valid], F.softmax(prediction, -1)[valid]
    target = (1 - a) * p + a * F.one_hot(labels[valid], V).float()
    assert loss.item() == pytest.approx(-(target * log_q).sum(-1).mean().item(), rel=1e-5)
    assert terms["critic_ce"].item() == pytest.approx(F.cross_entropy(logits[valid], labels[valid]).item(), rel=1e-5)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    assert terms["critic_kl"].item() == pytest.approx(kl.item(), rel=1e-4)
    assert critic_loss(prediction, prediction, labels, a)[1]["critic_kl"].abs().item() < 1e-5


def test_every_stage_but_the_first_holds_a_critic_and_the_last_a_block(config):
    variant = get_variant("critic")
    assert [variant.holds_block(k, 3) for k in range(3)] == [True, True, True]
    assert [get_variant("dgl").holds_block(k, 3) for k in range(3)] == [True, True, False]
    built = [build_stage(config, 3, k, seed=1, variant="critic") for k in range(3)]
    assert [b.feedback is not None for b in built] == [True, True, True]
    assert [b.feedback.critic is not None for b in built] == [False, True, True]
    # The last stage's block is its critic alone: its loss is the model's own.
    assert all(name.startswith("critic.") for name, _ in built[2].feedback.named_parameters())
    context = build_stage(config, 3, 2, seed=1, variant="critic-context-man").feedback
    assert all(name.startswith("critic.") for name, _ in context.named_parameters())
    assert built[1].sends_tables and variant.message_shape(config) == (V, H)
    # Seeded apart per stage: two stages' critics differ, and a rebuild is the same.
    assert not torch.equal(built[1].feedback.critic.weight, built[2].feedback.critic.weight)
    again = build_stage(config, 3, 2, seed=1, variant="critic")
    assert torch.equal(again.feedback.critic.weight, built[2].feedback.critic.weight)


def _micro_batch(config, built, generator):
    inputs = torch.randn(2, T, H, generator=generator)
    labels = torch.randint(0, V, (2, T), generator=generator)
    outputs = inputs
    for name, layer in built.module.named_children():
        if name != "bll_feedback":
            outputs = layer(outputs)
    return inputs, outputs, labels


def test_the_critics_loss_trains_the_critic_only_and_the_readout_scores_against_the_received_one(config):
    generator = torch.Generator().manual_seed(2)
    middle = build_stage(config, 3, 1, seed=1, variant="critic")
    step = StageStep(middle.feedback, lm_loss, False, variant=get_variant("critic"))
    received = torch.randn(V, H, generator=generator) * 0.1
    step.begin(received)
    inputs, outputs, labels = _micro_batch(config, middle, generator)
    inputs.requires_grad_()
    grads = {}

    def backward(loss, scale):
        grads["loss"] = loss.detach()
        loss.backward()

    loss = step.local_backward(outputs, labels, backward, inputs)
    # The stage's loss is the readout's against the received critic, by hand.
    feedback = middle.feedback
    readout = feedback.norm(outputs.detach()) @ received.t()
    assert loss.item() == pytest.approx(F.cross_entropy(readout.flatten(0, 1), labels.flatten()).item(), rel=1e-5)
    # The backward carried the critic's loss too, toward this stage's own prediction.
    critic, _ = critic_loss(feedback.critic(inputs), readout, labels, feedback.label_weight)
    assert grads["loss"].item() == pytest.approx(loss.item() + critic.item(), rel=1e-5)
    assert inputs.grad is None  # the stage's input is data to its critic
    assert feedback.critic.weight.grad.abs().sum() > 0 and feedback.critic.norm.weight.grad.abs().sum() > 0
    assert set(step.mean_terms()) >= {"ce", "critic_ce", "critic_kl"}
    assert torch.equal(step.table_to_publish(None), feedback.critic.weight.detach())

    # The last stage: its loss is the LM loss, its critic's target the LM head's prediction.
    last = build_stage(config, 3, 2, seed=1, variant="critic")
    step = StageStep(last.feedback, lm_loss, True, variant=get_variant("critic"))
    step.begin(None)
    inputs, logits, labels = _micro_batch(config, last, generator)
    seen = {}
    loss = step.local_backward(logits, labels, lambda total, scale: seen.update(total=total.detach()), inputs)
    critic, _ = critic_loss(last.feedback.critic(inputs), logits, labels, last.feedback.label_weight)
    assert loss.item() == pytest.approx(lm_loss(logits, labels).item(), rel=1e-6)
    assert seen["total"].item() == pytest.approx(loss.item() + critic.item(), rel=1e-5)


def test_declared_costs_in_the_flops_model_and_the_simulator(config):
    variant = get_variant("critic")
    assert variant.readout_flops_per_token(config) == 4 * H * V           # the received critic is data
    assert variant.input_critic_flops_per_token(config) == 6 * H * V      # forward, weight and input gradients
    assert get_variant("critic-context").readout_flops_per_token(config) == (4 + 6 * 2) * H * V
    split = stage_flop_split(config, 2, T, "bll", "critic")
    dgl = stage_flop_split(config, 2, T, "bll", "dgl")
    assert split[0].local_readout == pytest.approx(dgl[0].local_readout - 2 * H * V)
    assert split[1].local_readout == 6 * H * V and dgl[1].local_readout == 0  # the last stage's critic
    assert variant.table_bytes_per_step(config, 4) == V * H * 4
    assert variant.readout_saved_bytes_per_token(config, 4, 0) is not None  # the memory planner models it (test_memory.py)
    from bll_bench.simulate import layer_costs_from_flops, stage_costs
    layer = layer_costs_from_flops(config, T, 1, 1e12, variant="critic")
    assert layer.critic_s == pytest.approx(6 * H * V * T / 1e12)
    costs, dgl = stage_costs(layer, 2, 2, "bll"), stage_costs(layer_costs_from_flops(config, T, 1, 1e12, variant="dgl"),
                                                               2, 2, "bll")
    assert costs.local[1] - dgl.local[1] == pytest.approx(layer.critic_s)   # the last stage's critic
    assert costs.opt[1] > dgl.opt[1] and costs.opt[0] < dgl.opt[0]        # its weights; no free head on stage 0
    with pytest.raises(ValueError, match="does not take the option"):
        get_variant("critic-context-man:dim=4")  # the layer copy reads h_k in full


def test_with_dim_the_critic_is_factored_and_travels_as_one_stack(config):
    """critic:dim=r: C_k = U_k Q_k, trained on stage k+1 and sent as [U_k; Q_k^T]; stage k reads
    z = Q_k norm(h_k) and scores it against U_k, both as data, and trains no projection of its own."""
    r = 4
    spec = f"critic-context:dim={r}"
    variant = get_variant(spec)
    assert variant.message_shape(config) == (V + H, r)
    last = build_stage(config, 3, 2, seed=1, variant=spec)
    message = StageStep(last.feedback, lm_loss, True, variant=variant).table_to_publish(None)
    critic = last.feedback.critic
    assert message.shape == (V + H, r)
    assert torch.equal(message[:V], critic.weight) and torch.equal(message[V:], critic.project.weight.t())
    assert torch.allclose(message[V:].t() @ message[V:], torch.eye(r), atol=1e-5)  # Q starts orthonormal

    middle = build_stage(config, 3, 1, seed=1, variant=spec)
    # The context heads read h_k through the stage's own P_k; the critic's readout through Q_k.
    assert middle.feedback.reduce.weight.shape == (r, H) and all(head.weight.shape == (V, r)
                                                                 for head in middle.feedback.context_heads)
    assert build_stage(config, 3, 1, seed=1, variant=f"critic:dim={r}").feedback.reduce is None
    step = StageStep(middle.feedback, lm_loss, False, variant=variant)
    step.begin(message)
    generator = torch.Generator().manual_seed(4)
    inputs, outputs, labels = _micro_batch(config, middle, generator)
    outputs = outputs.detach().requires_grad_()

    def backward(loss, scale):
        loss.backward()

    step.local_backward(outputs, labels, backward, inputs)
    with torch.no_grad():
        z = middle.feedback.norm(outputs) @ message[V:]
        ce = F.cross_entropy((z @ message[:V].t()).flatten(0, 1), labels.flatten())
    assert step.mean_terms()["ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert outputs.grad.abs().sum() > 0  # h_k learns through the received projection
    assert middle.feedback.reduce.weight.grad.abs().sum() > 0  # and through its own, under the context heads
    own = middle.feedback.critic
    assert own.weight.grad.abs().sum() > 0 and own.project.weight.grad.abs().sum() > 0
    with torch.no_grad():
        by_hand = own.project(own.norm(inputs)) @ own.weight.t()
    assert torch.allclose(own(inputs), by_hand)
    # The declared costs: the received projection is data on stage k (4 H r), the stage's own P_k
    # is trained (6 H r), the critic's three products on stage k+1 (6 H r and 6 r V).
    assert variant.readout_flops_per_token(config) == 4 * H * r + 6 * H * r + (4 + 6 * 2) * r * V
    assert get_variant(f"critic:dim={r}").readout_flops_per_token(config) == 4 * H * r + 4 * r * V
    assert variant.input_critic_flops_per_token(config) == 6 * H * r + 6 * r * V
    assert variant.input_critic_parameters(config) == V * r + H * r
    assert get_variant(spec + ":table=bf16:refresh=2").table_bytes_per_step(config, 4) == (V + H) * r * 2 / 2


def _candidates_the_block_draws_next(block, labels, negatives):
    from bll_ds.method.variant_options import shared_candidates

    generator = torch.Generator().manual_seed(int(block.sample_seed) + 1_000_003 * int(block.draws))
    return shared_candidates(labels, V, negatives, generator)


def test_with_neg_the_critic_trains_on_the_candidates_of_the_stages_readout(config):
    """critic:neg=n: stage k+1's readout is the shared-candidate softmax, and its critic of h_k
    is trained toward that prediction over the same candidates; the last stage draws its own and
    restricts the LM head's logits to them."""
    n = 3
    spec = f"critic:neg={n}"
    variant = get_variant(spec)
    middle = build_stage(config, 3, 1, seed=1, variant=spec)
    step = StageStep(middle.feedback, lm_loss, False, variant=variant)
    generator = torch.Generator().manual_seed(5)
    received = torch.randn(V, H, generator=generator) * 0.1
    step.begin(received)
    inputs, outputs, labels = _micro_batch(config, middle, generator)
    candidates = _candidates_the_block_draws_next(middle.feedback, labels, n)
    assert len(candidates) < V
    seen = {}
    loss = step.local_backward(outputs, labels, lambda total, scale: seen.update(total=total.detach()), inputs)
    feedback = middle.feedback
    with torch.no_grad():
        readout = feedback.norm(outputs) @ received[candidates.ids].t() + candidates.log_weight
        targets = candidates.position(labels)
        critic, _ = critic_loss(feedback.critic(inputs, candidates), readout, targets, feedback.label_weight)
    assert loss.item() == pytest.approx(F.cross_entropy(readout.flatten(0, 1), targets.flatten()).item(), rel=1e-5)
    assert seen["total"].item() == pytest.approx(loss.item() + critic.item(), rel=1e-5)

    last = build_stage(config, 3, 2, seed=1, variant=spec)
    step = StageStep(last.feedback, lm_loss, True, variant=variant)
    step.begin(None)
    inputs, logits, labels = _micro_batch(config, last, generator)
    candidates = _candidates_the_block_draws_next(last.feedback, labels, n)
    loss = step.local_backward(logits, labels, lambda total, scale: seen.update(total=total.detach()), inputs)
    with torch.no_grad():
        critic, _ = critic_loss(last.feedback.critic(inputs, candidates),
                                logits[..., candidates.ids] + candidates.log_weight, candidates.position(labels),
                                last.feedback.label_weight)
    assert seen["total"].item() == pytest.approx(loss.item() + critic.item(), rel=1e-5)
    assert int(last.feedback.draws) == 1  # a checkpointed count: a resumed run draws what a straight one does


def test_neg_at_or_above_the_vocabulary_is_the_full_critic(config):
    """With every item a candidate (and no sampling correction) the losses are the full ones."""
    variant = get_variant("critic:neg=100")
    middle = build_stage(config, 3, 1, seed=1, variant="critic:neg=100")
    step = StageStep(middle.feedback, lm_loss, False, variant=variant)
    generator = torch.Generator().manual_seed(6)
    received = torch.randn(V, H, generator=generator) * 0.1
    step.begin(received)
    inputs, outputs, labels = _micro_batch(config, middle, generator)
    seen = {}
    loss = step.local_backward(outputs, labels, lambda total, scale: seen.update(total=total.detach()), inputs)
    feedback = middle.feedback
    with torch.no_grad():
        readout = feedback.norm(outputs) @ received.t()
        critic, _ = critic_loss(feedback.critic(inputs), readout, labels, feedback.label_weight)
    assert loss.item() == pytest.approx(F.cross_entropy(readout.flatten(0, 1), labels.flatten()).item(), rel=1e-5)
    assert seen["total"].item() == pytest.approx(loss.item() + critic.item(), rel=1e-5)


def test_behind_the_man_readout_the_critic_reads_the_next_layers_output(config):
    """critic-man: stage k reads h_k through Dbar_k (the average of stage k+1's first layer) and
    scores it against C_k; stage k+1 trains C_k on its first layer's output, which Dbar_k copies."""
    from bll_ds.method.overlap import first_decoder_layer

    variant = get_variant("critic-man")
    sender, middle = build_stage(config, 3, 2, seed=1, variant="critic-man"), build_stage(config, 3, 1, seed=1,
                                                                                           variant="critic-man")
    layers = [layer for name, layer in sender.module.named_children() if name != "bll_feedback"]
    step = StageStep(sender.feedback, lm_loss, True, variant=variant)
    message = step.table_to_publish(None, layers)
    assert message.shape == variant.message_shape(config)
    receiving = StageStep(middle.feedback, lm_loss, False, variant=variant)
    receiving.begin(message)
    generator = torch.Generator().manual_seed(3)
    inputs, outputs, labels = _micro_batch(config, middle, generator)
    loss = receiving.local_backward(outputs, labels, lambda total, scale: None, inputs,
                                    [layer for name, layer in middle.module.named_children() if name != "bll_feedback"])
    # The readout: through the received copy of stage 2's first layer, against stage 2's critic.
    with torch.no_grad():
        read = first_decoder_layer(layers)(outputs)
        logits = middle.feedback.norm(read) @ sender.feedback.critic.weight.t()
    assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item(), rel=1e-5)
    # The critic of the middle stage reads its own first layer's output.
    first = first_decoder_layer([layer for name, layer in middle.module.named_children() if name != "bll_feedback"])
    features = variant.critic_features(inputs, [first])
    assert torch.allclose(features, first(inputs)) and not features.requires_grad
    assert torch.equal(get_variant("critic").critic_features(inputs, [first]), inputs)
    assert variant.input_critic_flops_per_token(config) > get_variant("critic").input_critic_flops_per_token(config)


def test_labels_option_sets_the_critics_label_share_on_every_stage_that_trains_one(config):
    """labels=a: the share of the labels in every critic's target, the last stage's included, and
    what the stage step trains with (the critic's loss of a micro-batch against critic_loss by hand)."""
    assert get_variant("critic-context").options.labels == 0.5  # the default's share
    for spec in ("critic-context:labels=0.9", "critic:labels=0", "critic-context-man:labels=1"):
        share = float(spec.rsplit("=", 1)[1])
        blocks = [build_stage(config, 3, k, seed=1, variant=spec).feedback for k in (1, 2)]
        assert [b.label_weight for b in blocks] == [share, share]
    for bad in ("critic:labels=1.5", "critic:labels=-0.1", "critic:labels=x"):
        with pytest.raises(ValueError, match="labels="):
            get_variant(bad)
    with pytest.raises(ValueError, match="labels"):
        get_variant("dgl-context:labels=0.9")  # only the critic variants train a critic
    last = build_stage(config, 3, 2, seed=1, variant="critic:labels=0.9")
    inputs, outputs, labels = _micro_batch(config, last, torch.Generator().manual_seed(3))
    expected, _ = critic_loss(last.feedback.critic(inputs), outputs.detach(), labels, 0.9)
    got, _ = last.feedback.input_critic_loss(inputs, labels, outputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() != pytest.approx(critic_loss(last.feedback.critic(inputs), outputs.detach(), labels, 0.5)[0].item(),
                                       rel=1e-3)


def test_extrap_reads_the_critic_extrapolated_over_its_lag_by_hand_and_resumes_exactly(config):
    """extrap=lam: stage k reads C + lam (C - C_prev), from the two latest messages as they arrive
    (P_0 twice at the start: no difference yet), and the previous message travels in the block's
    state, so a block restored from a checkpoint reads what the uninterrupted one reads."""
    spec = "critic-context:labels=0.9:extrap=2"
    block = build_stage(config, 3, 0, seed=1, variant=spec).feedback
    p0, p1, p2 = (torch.full((V, H), value) for value in (1.0, 1.5, 1.75))
    block.prepare(p0)                      # start-up: P_0
    assert torch.equal(block.readout_operand(), p0)
    block.prepare(p0)                      # step 1 reads P_0 again: nothing to extrapolate from
    assert torch.equal(block.readout_operand(), p0)
    block.prepare(p1)                      # 1.5 + 2 (1.5 - 1.0)
    assert torch.equal(block.readout_operand(), torch.full((V, H), 2.5))
    assert [t.data_ptr() for t in block.step_tables()] == [block.readout_operand().data_ptr()]  # C_hat, held per step
    restored = build_stage(config, 3, 0, seed=1, variant=spec).feedback
    restored.load_state_dict(block.state_dict())
    for b in (block, restored):            # 1.75 + 2 (1.75 - 1.5)
        b.prepare(p2)
        assert torch.equal(b.readout_operand(), torch.full((V, H), 2.25))
    plain = build_stage(config, 3, 0, seed=1, variant="critic-context:labels=0.9").feedback
    plain.prepare(p1)
    plain.prepare(p2)
    assert torch.equal(plain.readout_operand(), p2) and plain.step_tables() == []
    assert "extrapolation._extra_state" not in plain.state_dict()  # old checkpoints load as before

    assert get_variant("critic-context").options.extrap == 0.0
    assert get_variant("critic-context-man:extrap=1.5").options.extrap == 1.5
    for bad, says in (("critic:extrap=-1", "extrap="), ("critic:extrap=2:refresh=2", "needs refresh=1"),
                      ("dgl-context:extrap=2", "does not take")):
        with pytest.raises(ValueError, match=says):
            get_variant(bad)


def test_extrap_declares_its_add_per_step_and_its_two_held_messages(config):
    """One subtraction, scaling and addition over the message per step on every stage that reads
    one; the planner holds the previous message and C_hat beside the inbox on those stages."""
    from bll_bench import memory

    spec = "critic-context:dim=4:neg=8:extrap=2"
    assert get_variant(spec).step_flops(config) == 3 * (V + H) * 4
    assert get_variant("critic-context:dim=4:neg=8").step_flops(config) == 0
    run = dict(micro_batch_size=2, seq_len=T, micro_batches=4, dtype="fp32", zero_stage=0)
    plain = memory.plan(config, 3, 1, method="bll", variant="critic-context:dim=4:neg=8", **run)
    extrap = memory.plan(config, 3, 1, method="bll", variant=spec, **run)
    message = (V + H) * 4 * 4
    assert [e.table_bytes - p.table_bytes for e, p in zip(extrap, plain)] == [2 * message, 2 * message, 0]
