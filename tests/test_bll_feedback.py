"""Local loss terms of every variant against values computed by hand on a tiny example."""

import math

import pytest
import torch

from bll_ds.method.feedback import build_feedback, collapse_guard
from bll_ds.modeling import load_model_spec

H, V = 4, 5


@pytest.fixture
def config(repo):
    config = load_model_spec(repo / "models/test-1m.json", vocab_size=V)
    config.hidden_size = H
    return config


def layer_norm_rows(x):
    """RMSNorm with unit gain (Llama's readout norm at initialisation), by hand."""
    return [[v / math.sqrt(sum(u * u for u in row) / len(row) + 1e-5) for v in row] for row in x]


def cross_entropy(scores, target):
    return -scores[target] + math.log(sum(math.exp(s) for s in scores))


def test_prototype_loss_is_cross_entropy_against_the_fed_back_prototypes(config):
    torch.manual_seed(0)
    feedback = build_feedback("prototype", config)
    upstream = torch.randn(V, H)
    hidden = torch.randn(1, 3, H)
    labels = torch.tensor([[0, 3, 4]])
    feedback.prepare(upstream)
    loss, terms = feedback.loss(hidden, labels)
    # g starts as the identity (zero-initialised output layer): prototypes = upstream table.
    normed = layer_norm_rows(hidden[0].tolist())
    table = upstream.tolist()
    by_hand = sum(cross_entropy([sum(a * b for a, b in zip(row, proto)) for proto in table], y)
                  for row, y in zip(normed, labels[0].tolist())) / 3
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(by_hand, rel=1e-5)
    assert terms["table_drift"].item() == 0.0  # g_k starts as the identity


def test_prototype_gradient_reaches_the_feedback_network_once_per_step(config):
    torch.manual_seed(1)
    feedback = build_feedback("prototype", config)
    feedback.prepare(torch.randn(V, H))
    for _ in range(2):  # two micro-batches share the step's table
        loss, _ = feedback.loss(torch.randn(1, 3, H), torch.tensor([[1, 2, 3]]))
        loss.backward()
    assert feedback.g.down.weight.grad is None  # not yet: the table gradient is still accumulating
    feedback.finish_step(lambda surrogate: surrogate.backward())
    assert feedback.g.down.weight.grad.abs().sum() > 0


def guard_by_hand(rows, min_std=1.0):
    """(spread, decorrelation) of a list of equal-length rows, over the rows."""
    n, d = len(rows), len(rows[0])
    columns = list(zip(*rows))
    means = [sum(c) / n for c in columns]
    stds = [math.sqrt(sum((v - m) ** 2 for v in c) / n + 1e-4) for c, m in zip(columns, means)]
    spread = sum(max(0.0, min_std - s) for s in stds) / d
    cov = [[sum((rows[r][i] - means[i]) * (rows[r][j] - means[j]) for r in range(n)) / (n - 1)
            for j in range(d)] for i in range(d)]
    return spread, sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d


def test_gaussian_loss_terms_by_hand(config):
    torch.manual_seed(2)
    feedback = build_feedback("gaussian:guard=0.5", config)
    upstream = torch.randn(V, H) * 2
    hidden = torch.randn(1, 3, H)
    labels = torch.tensor([[4, 1, 1]])
    feedback.prepare(upstream)
    loss, terms = feedback.loss(hidden, labels)
    normed = layer_norm_rows(hidden[0].tolist())  # projection starts as the identity
    table = upstream.tolist()
    var = 0.5 + 0.5
    per_unit = [(m - n) ** 2 / (2 * var) + 0.5 * math.log(2 * math.pi * var)
                for row, y in zip(normed, labels[0].tolist()) for m, n in zip(row, table[y])]
    agreement = sum(per_unit) / len(per_unit)
    assert terms["agreement"].item() == pytest.approx(agreement, rel=1e-5)
    spread, decorrelation = guard_by_hand(table)
    assert terms["guard_spread"].item() == pytest.approx(spread, abs=1e-6)
    assert terms["guard_decorrelation"].item() == pytest.approx(decorrelation, rel=1e-5)
    out_spread, out_decorrelation = guard_by_hand(normed)
    assert terms["guard_out_spread"].item() == pytest.approx(out_spread, abs=1e-6)
    assert terms["guard_out_decorrelation"].item() == pytest.approx(out_decorrelation, rel=1e-5)
    guard = spread + decorrelation + out_spread + out_decorrelation
    assert loss.item() == pytest.approx(agreement + 0.5 * guard, rel=1e-5)


def test_bernoulli_loss_by_hand(config):
    torch.manual_seed(3)
    feedback = build_feedback("bernoulli:guard=2", config)
    upstream = torch.randn(V, H)
    hidden = torch.randn(1, 3, H)
    labels = torch.tensor([[2, 2, 0]])
    feedback.prepare(upstream)
    loss, terms = feedback.loss(hidden, labels)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    normed = layer_norm_rows(hidden[0].tolist())
    per_unit = [-math.log(sig(a) * sig(b) + (1 - sig(a)) * (1 - sig(b)))
                for row, y in zip(normed, labels[0].tolist()) for a, b in zip(row, upstream[y].tolist())]
    agreement = sum(per_unit) / len(per_unit)
    assert terms["agreement"].item() == pytest.approx(agreement, rel=1e-5)
    # The guard acts on the mean parameters p = sigmoid(logit), with a floor of 0.25 on their spread.
    table_p = [[sig(v) for v in row] for row in upstream.tolist()]
    out_p = [[sig(v) for v in row] for row in normed]
    guard = sum(guard_by_hand(table_p, 0.25)) + sum(guard_by_hand(out_p, 0.25))
    assert terms["guard_out_spread"].item() == pytest.approx(guard_by_hand(out_p, 0.25)[0], abs=1e-6)
    assert loss.item() == pytest.approx(agreement + 2.0 * guard, rel=1e-5)


@pytest.mark.parametrize("variant", ["dgl", "drtp"])
def test_readout_variants_by_hand(config, variant):
    torch.manual_seed(4)
    feedback = build_feedback(variant, config)
    feedback.prepare(None)
    hidden = torch.randn(1, 2, H)
    labels = torch.tensor([[0, 2]])
    loss, _ = feedback.loss(hidden, labels)
    weights = (feedback.head.weight if variant == "dgl" else feedback.table).tolist()
    normed = layer_norm_rows(hidden[0].tolist())
    by_hand = sum(cross_entropy([sum(a * b for a, b in zip(row, w)) for w in weights], y)
                  for row, y in zip(normed, labels[0].tolist())) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    if variant == "drtp":
        assert not any(p.requires_grad and p.dim() == 2 for p in feedback.parameters())  # fixed feedback


def test_collapse_guard_penalises_a_collapsed_table():
    collapsed = torch.ones(8, 3)
    spread, _ = collapse_guard(collapsed)
    assert spread.item() == pytest.approx(1 - math.sqrt(1e-4), rel=1e-6)
    healthy = torch.randn(4096, 3) * 2
    assert collapse_guard(healthy)[0].item() == 0.0
