"""What one block-local stage does with one micro-batch and at the step boundary: the only copy.

Every driver of a stage (the launched engine, the emulator, the scale rehearsal) runs it through
bll_ds/pipeline/block_local_stage.py's `BlockLocalStage`, which owns the step's order, its
compute and message hooks and its record. Next to docs/METHOD.md:

    step t begins    begin(P)            P = P_{t-2}, the downstream stage's lagged table (§4);
                                         feedback.prepare: m_k = g_k(P) computed once, no graph (§3)
    micro-batch m    (engine: receive x, h_k = f_k(x), send h_k.detach() downstream)
                     local_backward      L_k = -log integral alpha_k(z) beta_k(z) dz         (§1)
                                         = CE(norm_k(h_k) m_k^T, y_t) for prototype, ...   (§3 table)
                                         last stage: the LM loss CE(W_out norm(h), y_t);
                                         critic variants, every stage but the first, also:
                                         L_critic of C_{k-1} on the stage's input (critic.py);
                                         dL_k/d(theta_k, m_k) accumulated, scaled by 1/M;
                                         a per-token readout runs in sequence slices (§3 slices)
    step t ends      STEP_END, in order:
                     finish_feedback     dL/dm_k accumulated over the step, pushed through g_k once
                     reduce_grads        all-reduce over the stage's replicas; a non-finite step is
                                         decided here and dropped (pipeline/nonfinite.py)
                     optimizer_step      clip by this stage's own norm, step its own optimizer
                     publish_table       m_k (last stage: W_out) sent upstream, detached (variants
                                         that send more compose it: bll_ds/method/overlap.py;
                                         critic variants send C_{k-1}; direct feedback's tables
                                         go from the last stage to every stage)

`backward(loss, scale_by_micro_batches)` is supplied by the caller: DeepSpeed's engine backward
(which divides by the gradient-accumulation steps when asked) or a plain autograd stand-in.
Nothing here waits for another stage or sends a gradient anywhere.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from bll_ds.method.feedback import StageFeedback
from bll_ds.method.variants import Variant

Backward = Callable[[torch.Tensor, bool], None]

# The step boundary, in the order every caller runs it (bll_schedule.py builds its instructions
# from this tuple; rehearse.py calls run_step_end).
STEP_END = ("finish_feedback", "reduce_grads", "optimizer_step", "publish_table")


def run_step_end(operations: dict[str, Callable[[], None]]) -> None:
    """Run the step-end operations in STEP_END order (every name must be given)."""
    for name in STEP_END:
        operations[name]()


def slices_for(variant: Variant, hidden_shape, vocab_size: int, max_logits_mb: float) -> int:
    """Sequence slices that keep one slice's fp32 logits under `max_logits_mb` (0 = one slice).
    Only a per-token readout can be sliced: a collapse guard takes statistics over all tokens.
    `variant`: the run's Variant (method/variants.py get), resolved once by the caller."""
    if not variant.per_token_readout or max_logits_mb <= 0:
        return 1
    batch, tokens = hidden_shape[0], hidden_shape[1]
    logits_mb = batch * tokens * vocab_size * 4 / 2**20
    return max(1, min(tokens, math.ceil(logits_mb / max_logits_mb)))


def sliced_local_backward(feedback: StageFeedback, hidden: torch.Tensor, labels: torch.Tensor, slices: int,
                          backward: Backward) -> tuple[torch.Tensor, dict]:
    """Local loss of `hidden` against `labels`, backward included, in `slices` sequence slices.

    A readout saves its [tokens, V] logits for backward (256 MiB per sequence at V = 32k and 2k
    tokens in fp32). Each slice's loss is back-propagated at once into a detached copy of the
    block output, so one slice's logits are alive at a time; the block's own backward then runs
    once from the accumulated gradient. Loss, terms (token-weighted means) and every gradient are
    those of the unsliced readout, summed in another order."""
    detached = hidden.detach().requires_grad_()
    total = labels.numel()
    loss_sum, term_sums = torch.zeros((), device=hidden.device), {}
    for index in torch.arange(hidden.shape[1]).tensor_split(slices):
        part = slice(int(index[0]), int(index[-1]) + 1)
        loss, terms = feedback.loss(detached[:, part], labels[:, part])
        weight = labels[:, part].numel() / total
        backward(loss * weight, True)  # readout weights, table and detached.grad (scaled like the loss)
        loss_sum = loss_sum + loss.detach().float() * weight
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value.float() * weight
    # The block's backward, once: detached.grad already carries the 1/accumulation scaling.
    backward((hidden * detached.grad.to(hidden.dtype)).sum(), False)
    return loss_sum, term_sums


class StageStep:
    """One stage's local learning. The last stage's loss is `lm_loss(outputs, labels)`; it holds a
    feedback block only where the variant trains a critic of each stage's input (critic.py).
    `readout_max_logits_mb` as --bll_readout_max_logits_mb."""

    def __init__(self, feedback: StageFeedback | None, lm_loss, last: bool, readout_max_logits_mb: float = 0.0,
                 variant: Variant | None = None):
        """`variant`: the run's Variant (method/variants.py get, resolved once), which decides what
        a last stage without a feedback block sends upstream; the other stages take it from their
        block."""
        self.feedback, self.last = feedback, last
        self.variant = feedback.variant if feedback is not None else variant
        self.lm_loss = lm_loss
        self.readout_max_logits_mb = readout_max_logits_mb
        self.losses: list[torch.Tensor] = []  # this step's, one per micro-batch
        self.terms: dict[str, list[torch.Tensor]] = {}

    def begin(self, table: torch.Tensor | None) -> None:
        """A new optimizer step, with the downstream table it uses (None: the variant has none)."""
        self.losses, self.terms = [], {}
        if self.feedback is not None and not self.last:  # the last stage receives nothing
            self.variant.receive(self.feedback, table)

    def readout_slices(self, hidden_shape) -> int:
        if self.last:
            return 1
        return slices_for(self.variant, hidden_shape, self.feedback.vocab_size, self.readout_max_logits_mb)

    def local_backward(self, outputs: torch.Tensor, labels: torch.Tensor, backward: Backward,
                       inputs: torch.Tensor | None = None, stage_layers=()) -> torch.Tensor:
        """The micro-batch's local loss and its backward inside the stage; returns the loss.
        `inputs`: what the stage received (h_{k-1}), for a variant that trains a critic of it
        (read through the stage's first layer, `stage_layers`, where Variant.critic_features
        says); its loss joins the stage's backward but not the loss returned and logged."""
        slices = self.readout_slices(outputs.shape)
        if slices > 1:
            loss, terms = sliced_local_backward(self.feedback, outputs, labels, slices, backward)
        else:
            if self.last:
                loss, terms = self.lm_loss(outputs, labels), {}
            else:
                loss, terms = self.feedback.loss(outputs, labels)
            total = loss
            if self.feedback is not None and self.feedback.critic is not None:
                # The last stage's prediction is its output, the LM logits; elsewhere the block
                # kept its readout's from the loss above.
                features = self.variant.critic_features(inputs, stage_layers)
                critic, critic_terms = self.feedback.input_critic_loss(features, labels,
                                                                       outputs if self.last else None)
                total, terms = loss + critic, {**terms, **critic_terms}
            backward(total, True)
        self.losses.append(loss.detach().float())
        for name, value in terms.items():
            self.terms.setdefault(name, []).append(value.float())
        return loss

    def finish_feedback(self, backward: Backward) -> None:
        """The feedback network's update of this step: one backward through g_k."""
        if self.feedback is not None:
            self.feedback.finish_step(lambda surrogate: backward(surrogate, False))

    def table_to_publish(self, lm_head_weight: torch.Tensor | None, stage_layers=()) -> torch.Tensor | None:
        """What goes upstream after the optimizer step: the variant's message built from m_k (on
        the last stage W_out itself) and, for variants that ask, this stage's forward layers."""
        table = lm_head_weight.detach() if self.last and self.feedback is None else self.feedback.publish()
        if self.variant is None:
            return table
        return self.variant.compose_message(table, stage_layers)

    def mean_loss(self) -> float:
        return torch.stack(self.losses).mean().item()

    def mean_terms(self) -> dict[str, float]:
        return {name: torch.stack(values).mean().item() for name, values in self.terms.items()}
