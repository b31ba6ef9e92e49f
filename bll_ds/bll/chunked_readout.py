"""The local readout in slices of the sequence, so that one slice's logits are alive at a time.

A readout over the vocabulary saves its [batch, tokens, V] logits (and their softmax) for
backward. At V = 32k and 2k tokens that is 256 MiB per sequence in fp32: as much as a 1B model's
stage of two decoder layers, and on top of it. Splitting the readout over the sequence and running
each slice's backward at once (into a detached copy of the block's output) keeps a single slice
alive; the block's own backward then runs once, from the accumulated gradient. The loss and every
gradient are those of the unsliced readout, summed in a different order.

Only the per-token losses (prototype, dgl, drtp) can be sliced. The gaussian and bernoulli
variants' collapse guard takes statistics over all tokens of the micro-batch, so they keep one
slice.
"""

from __future__ import annotations

import math

import torch

SLICEABLE_VARIANTS = ("prototype", "dgl", "drtp")


def slices_for(variant: str, hidden_shape: torch.Size, vocab_size: int, max_logits_mb: float) -> int:
    """How many sequence slices keep one slice's fp32 logits under `max_logits_mb` (0 = one slice)."""
    if variant not in SLICEABLE_VARIANTS or max_logits_mb <= 0:
        return 1
    batch, tokens = hidden_shape[0], hidden_shape[1]
    logits_mb = batch * tokens * vocab_size * 4 / 2**20
    return max(1, min(tokens, math.ceil(logits_mb / max_logits_mb)))


def sliced_local_backward(feedback, hidden: torch.Tensor, labels: torch.Tensor, slices: int, backward):
    """Local loss of `hidden` against `labels`, backward included, in `slices` sequence slices.

    `backward(loss, scale_wrt_gas)` is the engine's backward (DeepSpeed's, which divides by the
    gradient-accumulation steps when asked). Returns the loss and loss terms as the unsliced
    `feedback.local_loss` would (token-weighted means of the slices')."""
    detached = hidden.detach().requires_grad_()
    total = labels.numel()
    loss_sum, term_sums = torch.zeros((), device=hidden.device), {}
    for index in torch.arange(hidden.shape[1]).tensor_split(slices):
        part = slice(int(index[0]), int(index[-1]) + 1)
        loss, terms = feedback.local_loss(detached[:, part], labels[:, part])
        weight = labels[:, part].numel() / total
        backward(loss * weight, True)  # readout weights, table and detached.grad (scaled like the loss)
        loss_sum = loss_sum + loss.detach().float() * weight
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value.float() * weight
    # The block's backward, once: detached.grad already carries the 1/accumulation scaling.
    backward((hidden * detached.grad.to(hidden.dtype)).sum(), False)
    return loss_sum, term_sums
