"""Screen only (not in the package): critic-context whose reconstruction heads reach further back,
offsets 1, 2, 4, 8 (4 heads) instead of 1, 2. Hypothesis: at character level the two nearest
tokens are trivially decodable (context_ce ~0.003 nats), so the terms do not make a block gather
earlier context for the blocks after it; farther offsets would."""
from bll_ds.method.context import masked_mean, preceding_tokens
from bll_ds.method.critic import ContextCriticFeedback
from bll_ds.method.variants import register

OFFSETS = (1, 2, 4, 8)


@register
class FarContextCritic(ContextCriticFeedback):
    name = "critic-farctx"
    offsets = len(OFFSETS)
    readout_heads = 1 + len(OFFSETS)

    def local_loss(self, hidden, labels):
        ce, terms, (z, candidates) = self.next_token_loss(hidden, labels)
        reconstruction = 0.0
        for offset, head in zip(OFFSETS, self.context_heads):
            targets = preceding_tokens(labels, offset)
            term = masked_mean(self.readout_cross_entropy(z, head.weight, targets, candidates), targets)
            terms[f"context_ce_{offset}"] = term.detach()
            reconstruction = reconstruction + term / len(self.context_heads)
        return ce + self.weight * reconstruction, terms
