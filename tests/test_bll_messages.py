"""Every closed-form agreement loss equals -log of the integral (or sum) of alpha * beta,
computed numerically."""

import math

import pytest
import torch

from bll_ds.method.messages import (bernoulli_agreement, categorical_agreement, delta_categorical_agreement,
                                 gaussian_agreement)


@pytest.mark.parametrize("mu,nu,var_a,var_b", [(0.3, -1.2, 0.5, 0.5), (2.0, 2.5, 0.1, 1.7), (-3.0, 1.0, 2.0, 0.05)])
def test_gaussian_closed_form_matches_numerical_integral(mu, nu, var_a, var_b):
    z = torch.linspace(-30, 30, 600_001, dtype=torch.float64)

    def density(mean, var):
        return torch.exp(-(z - mean) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)

    numeric = -math.log(torch.trapezoid(density(mu, var_a) * density(nu, var_b), z).item())
    closed = gaussian_agreement(torch.tensor(mu, dtype=torch.float64), torch.tensor(nu, dtype=torch.float64),
                                var_a, var_b).item()
    assert closed == pytest.approx(numeric, rel=1e-7)


@pytest.mark.parametrize("a,b", [(0.0, 0.0), (2.0, -1.0), (-4.0, -3.0), (30.0, -30.0)])
def test_bernoulli_closed_form_matches_enumeration(a, b):
    def bernoulli(logit, z):  # P(z); 1 - sigmoid(x) written as sigmoid(-x) to keep its digits
        return 1 / (1 + math.exp(-logit if z else logit))

    numeric = -math.log(sum(bernoulli(a, z) * bernoulli(b, z) for z in (0, 1)))
    assert bernoulli_agreement(torch.tensor(a, dtype=torch.float64),
                               torch.tensor(b, dtype=torch.float64)).item() == pytest.approx(numeric, rel=1e-9)


def test_categorical_closed_form_matches_enumeration():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    alpha, beta = torch.softmax(a, -1), torch.softmax(b, -1)
    numeric = -torch.log((alpha * beta).sum(-1))
    torch.testing.assert_close(categorical_agreement(a, b), numeric)


def test_point_mass_forward_message_gives_the_cross_entropy():
    # alpha = delta at h: the integral picks beta(h) = q(y | h), the softmax probability of y.
    scores = torch.tensor([[1.0, 2.0, 0.5]])
    target = torch.tensor([1])
    probability = math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(0.5))
    assert delta_categorical_agreement(scores, target).item() == pytest.approx(-math.log(probability), rel=1e-6)


def test_agreement_is_smallest_when_messages_agree():
    nu = torch.tensor(0.7)
    losses = [gaussian_agreement(torch.tensor(m), nu, 0.5, 0.5).item() for m in (-1.0, 0.0, 0.7, 1.5)]
    assert min(losses) == losses[2]
