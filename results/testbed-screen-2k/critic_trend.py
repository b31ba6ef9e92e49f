"""Screen only (not in the package): the received critic extrapolated along its averaged trend.

`extrap=2` (message_extrapolation.py) reads C + 2 (C - C_prev). At the full budget on the S = 8
testbed (seed 1234) its lead over the critic read as received shrinks as the learning rate decays:
every stage's training cross-entropy is 1.0-1.2% lower over steps 1500-2000, 0.0-0.4% over steps
3500-6000 and 0.3-0.6% over steps 7500-8000; the final held-out loss is 0.3% lower. One step's
difference is the critic's drift plus
its update noise; extrapolating it doubles the noise of the latest update into what stage k reads,
which costs more than the drift it recovers once the drift per step is small. Averaging the
difference keeps the drift and cuts the noise (by (1 - beta) / (1 + beta) in variance for
independent steps):

    v^(t) = beta v^(t-1) + (1 - beta) (C^(t-2) - C^(t-3))        beta = 0.9; v starts at 0
    C_hat = C^(t-2) + lam v^(t)                                  lam = 2, the lag

Cost beyond extrap=: one more held message (v) and two more element-wise passes per step.
Checkpointed as the block's extra state, as extrap='s previous message. Registered as
critic-context-trend (lam = 2, beta = 0.9; options as critic-context's, extrap= not used)."""
import torch

from bll_ds.method.critic import ContextCriticFeedback
from bll_ds.method.message_extrapolation import MessageExtrapolation
from bll_ds.method.variants import register

LAM, BETA = 2.0, 0.9


class TrendExtrapolation(MessageExtrapolation):
    def __init__(self, lam: float, beta: float):
        super().__init__(lam)
        self.beta = beta
        self.velocity: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, message):
        previous, self.previous = self.previous, message.detach()
        if previous is None:
            return message
        step = message - previous.to(device=message.device, dtype=message.dtype)
        if self.velocity is None:
            self.velocity = torch.zeros_like(step)
        self.velocity = self.velocity.to(step) * self.beta + (1 - self.beta) * step
        return message + self.lam * self.velocity

    def get_extra_state(self):
        return {"previous": super().get_extra_state(),
                "velocity": None if self.velocity is None else self.velocity.cpu()}

    def set_extra_state(self, state):
        super().set_extra_state(state["previous"])
        self.velocity = state["velocity"]


@register
class TrendCritic(ContextCriticFeedback):
    name = "critic-context-trend"

    def __init__(self, config, options):
        super().__init__(config, options)
        self.extrapolation = TrendExtrapolation(LAM, BETA)
