"""Screen only (not in the package): critic-context plus a head that predicts the token after the
next one (multi-token prediction as a local term).

On the testbed the blocks after the second add almost nothing under any cheap local loss
(quality.md: under dgl-context stages 2-7 add 0.030 nats between them): every block's output is
asked only to decode y_t now, so nothing asks block k for the context features a later block would
build on. Predicting y_{t+1} = x_{t+2} from h_t needs more of the context than y_t does; a head for
it asks block k to carry that. The reconstruction heads (1 and 2 tokens back) stay.

    L_k = critic-context's loss + mu * CE(F_k z_t, y_{t+1})      mu = 0.5, F_k a free head on the
                                                                 readout's z; the last position of
                                                                 each sequence has no y_{t+1}

Registered as critic-future."""
from bll_ds.method.context import IGNORE, masked_mean, preceding_tokens
from bll_ds.method.critic import ContextCriticFeedback
from bll_ds.method.variants import register

FUTURE_WEIGHT = 0.5


def following_tokens(labels):
    """y_{t+1} for every position t of [B, T] next-token labels, IGNORE at the last position."""
    shifted = labels.new_full(labels.shape, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    return shifted


@register
class FutureTokenCritic(ContextCriticFeedback):
    name = "critic-future"
    offsets = 3            # heads: 1 and 2 tokens back, and the token after next
    readout_heads = 1 + 3

    def local_loss(self, hidden, labels):
        ce, terms, (z, candidates) = self.next_token_loss(hidden, labels)
        *back, ahead = self.context_heads
        reconstruction = 0.0
        for offset, head in enumerate(back, start=1):
            targets = preceding_tokens(labels, offset)
            term = masked_mean(self.readout_cross_entropy(z, head.weight, targets, candidates), targets)
            terms[f"context_ce_{offset}"] = term.detach()
            reconstruction = reconstruction + term / len(back)
        targets = following_tokens(labels)
        future = masked_mean(self.readout_cross_entropy(z, ahead.weight, targets, candidates), targets)
        terms["future_ce"] = future.detach()
        return ce + self.weight * reconstruction + FUTURE_WEIGHT * future, terms
