"""Direct feedback: every stage's target table from the last stage, in one hop.

Through the chain (feedback.py), stage k's table has passed through S - 1 - k feedback blocks and
is 2 (S - 1 - k) steps old when it is used: at S = 16, stage 0's is 30 steps old. Direct
feedback sends the last stage's table to every stage at once (direct feedback alignment's
topology, with the paper's trained feedback blocks in place of fixed random matrices):

    the last stage publishes P_j = W_out after its optimizer step j (P_0 at start-up) to every
    stage k < S - 1; stage k uses P_{max(t - LAG, 0)} during its step t (LAG = 2, for every k)
    m_k = g_k(P)        g_k: stage k's own TableMap, mapping the head's table into its own space
    L_k = -log softmax(<norm(h_k), m_k(v)>)(y_t)          (prototype's loss; with -context, +
                                                         the reconstruction terms of context.py)

The stages between send nothing. Wait-free as the chain is when the step has at least S - 1
micro-batches: the last stage runs S - 1 - k micro-batches behind stage k, so P_{t-2} was sent
before stage k begins step t. With fewer, stage k may wait for the last stage's step t - 2 (a
bubble, not a dependence on the current step).

Bytes: the last stage sends S - 1 tables per step (one per stage, V x H each, or what the
prototype options make them); summary.json counts each in the last stage's bytes_up. The
simulator makes each stage wait for the last stage's table (bll_bench/simulate.py Link
tables_from_last); the memory planner, which places one outbox per stage, does not model it yet.
"""

from __future__ import annotations

from bll_ds.method.context import _ContextTerms
from bll_ds.method.feedback import PrototypeFeedback
from bll_ds.method.variants import register


@register
class DirectFeedback(PrototypeFeedback):
    """prototype's readout; its table is the last stage's, sent to every stage directly."""

    name = "direct"
    tables_from_last_stage = True

    @classmethod
    def readout_saved_bytes_per_token(cls, options, config, dtype_bytes, norm_saved_bytes, micro_batch_tokens=None):
        return None  # the planner places one outbox per stage; here the last stage holds S - 1


@register
class ContextDirectFeedback(_ContextTerms, DirectFeedback):
    """Direct feedback's readout plus the reconstruction heads of context.py."""

    name = "direct-context"
