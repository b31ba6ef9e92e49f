"""Screen only (not in the package): the averaged next-layer copy on a fraction of the positions.

critic-context-man reads every position of h_k through Dbar_k, the averaged copy of stage k+1's
first decoder layer, at about 0.7 of a decoder layer per token: over the 5% budget. A copy needs
every position's keys and values, but its queries, its MLP and the readout after it only where a
loss is taken. So the question: does block k keep the copy's gain when only 1 position in n is
read through it, beside critic-context's loss on every position?

    L_k = critic-context's loss of h_k                           every position; C_k trained on h_k
        + CE(norm(A_k(h_k))_t C_k^T, y_t) over t in P            P: 1 position in n, the offset
                                                                  moving by one every micro-batch
    A_k(h) = Dbar_k(gamma_k h + b_k)                             next_layer_average.py

The copy is computed at every position here (the testbed's cost does not matter); at scale its
queries, output projection and MLP would run on P only, so at llama-1b shapes n = 32 costs about
0.7 / 32 of a layer beyond the keys and values. The critic of stage k's input is trained on h_k,
as critic-context's (the critic-man variants train it on the copy's output instead).

Registered as critic-context-mansub8 (n = 8), the one run."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bll_ds.method import variants
from bll_ds.method.context import IGNORE
from bll_ds.method.critic import ContextCriticFeedback
from bll_ds.method.messages import delta_categorical_agreement
from bll_ds.method.next_layer_average import AveragedNextLayer


@dataclass(frozen=True)
class _CriticOnInput(variants.Variant):
    """The composed variant, with the critic trained on the stage's input, not the copy's output."""

    def critic_features(self, inputs, stage_layers):
        return inputs


def _register(every: int) -> None:
    class SubsetCopyCritic(ContextCriticFeedback):
        name = f"critic-context-mansub{every}"

        def __init__(self, config, options):
            super().__init__(config, options)
            self._calls = 0

        def loss(self, hidden, labels):
            loss, terms = self.local_loss(hidden, labels)  # critic-context on every position
            prediction = self.prediction                    # the target the next stage's critic takes
            offset = self._calls % every
            self._calls += 1
            positions = torch.zeros(labels.shape[1], dtype=torch.bool, device=labels.device)
            positions[offset::every] = True
            through = self.norm(self.aux(hidden))
            logits = through @ self.readout_operand().to(through.dtype).t()
            picked = labels[:, positions]
            per_token = delta_categorical_agreement(logits[:, positions], picked)
            copy_ce = per_token.sum() / (picked != IGNORE).sum().clamp_min(1)
            self.prediction = prediction
            return loss + copy_ce, {**terms, "copy_ce": copy_ce.detach()}

    SubsetCopyCritic.__qualname__ = SubsetCopyCritic.__name__ = f"SubsetCopyCritic{every}"
    variants._add(_CriticOnInput(SubsetCopyCritic.name, SubsetCopyCritic, AveragedNextLayer))


_register(8)
