"""Exponential-family messages and their agreement losses, in closed form.

Kappel et al. (arXiv 2305.14974) view the output of block k as the parameters of a distribution
over a latent z_k. Two messages meet there:

    alpha_k(z) ~ p(z_k | x)     forward message, computed by the forward blocks 1..k
    beta_k(z)  ~ p(y | z_k)     backward message, computed from the targets by the feedback network

and p(y | x) = integral alpha_k(z) beta_k(z) dz for every k. Block k's local loss is the
disagreement of the two messages,

    L_k = -log integral alpha_k(z) beta_k(z) dz,                                        (paper, eq. for L_k)

which each function below evaluates exactly for one family, elementwise per latent unit (the
paper factorises messages over units; callers sum or average over units and tokens).
tests/test_bll_messages.py checks every closed form against numerical integration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def gaussian_agreement(mu: torch.Tensor, nu: torch.Tensor, var_a: torch.Tensor | float,
                       var_b: torch.Tensor | float) -> torch.Tensor:
    """alpha = N(z; mu, var_a), beta = N(z; nu, var_b):

        -log integral N(z; mu, var_a) N(z; nu, var_b) dz = -log N(mu; nu, var_a + var_b)
            = (mu - nu)^2 / (2 (var_a + var_b)) + 1/2 log(2 pi (var_a + var_b))
    """
    var = torch.as_tensor(var_a, dtype=mu.dtype, device=mu.device) + var_b
    return (mu - nu).pow(2) / (2 * var) + 0.5 * (LOG_2PI + torch.log(var))


def bernoulli_agreement(logit_a: torch.Tensor, logit_b: torch.Tensor) -> torch.Tensor:
    """alpha = Bernoulli(p = sigmoid(a)), beta = Bernoulli(q = sigmoid(b)), z in {0, 1}:

        -log sum_z alpha(z) beta(z) = -log(p q + (1 - p)(1 - q))

    computed in log space: log(p q + (1-p)(1-q)) = logaddexp(logsig(a) + logsig(b), logsig(-a) + logsig(-b)).
    """
    both_one = F.logsigmoid(logit_a) + F.logsigmoid(logit_b)
    both_zero = F.logsigmoid(-logit_a) + F.logsigmoid(-logit_b)
    return -torch.logaddexp(both_one, both_zero)


def categorical_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """alpha = softmax(a), beta = softmax(b) over the last axis (K categories):

        -log sum_i alpha_i beta_i = -logsumexp(log_softmax(a) + log_softmax(b))
    """
    return -torch.logsumexp(F.log_softmax(logits_a, -1) + F.log_softmax(logits_b, -1), dim=-1)


def delta_categorical_agreement(target_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """alpha concentrated on the block output h (a point mass), beta(h) = q(y | h) = softmax over
    the vocabulary of the feedback network's scores for h. Then the integral picks beta at h:

        -log integral delta(z - h) q(y | z) dz = -log q(y | h) = cross-entropy(scores(h), y)

    This is the default instantiation for causal LMs (docs/METHOD.md §3, the prototype variant):
    beta is a proper distribution over the vocabulary, so it cannot collapse to a constant.
    """
    return F.cross_entropy(target_logits.float().reshape(-1, target_logits.shape[-1]), target.reshape(-1),
                           reduction="none").reshape(target.shape)
