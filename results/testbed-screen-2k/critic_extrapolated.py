"""Screen only (not in the package): the received critic extrapolated over its lag.

Stage k reads C_k as stage k+1 published it two steps ago (the tables' lag rule), while a free
head (dgl-context) is current. At S = 16 the default trails dgl-context at every stage from stage
0 on (quality.md), which points at that lag. Weight prediction (PipeMare, SpecTrain) answers stale
weights in pipelines by extrapolating them; here, at no cost beyond one [V, H] add per step:

    C_hat = C^(t-2) + lam (C^(t-2) - C^(t-3))       lam = 2, the lag in steps; the two latest
                                                    messages received (the first step: C^(t-2))

Stage k reads C_hat instead of C^(t-2); nothing else changes (the critic's training on stage k+1,
the message, the context heads). Registered as critic-context-extrap."""
from bll_ds.method.critic import ContextCriticFeedback
from bll_ds.method.variants import register

LAM = 2.0


@register
class ExtrapolatedCritic(ContextCriticFeedback):
    name = "critic-context-extrap"

    def __init__(self, config, options):
        super().__init__(config, options)
        self._previous = None

    def prepare(self, upstream_table):
        received = upstream_table
        if upstream_table is not None and self._previous is not None and self._previous.shape == upstream_table.shape:
            received = upstream_table + LAM * (upstream_table - self._previous.to(upstream_table.dtype))
        self._previous = None if upstream_table is None else upstream_table.detach().clone()
        super().prepare(received)
