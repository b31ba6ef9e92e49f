"""The received message extrapolated over its lag (the `extrap=lam` option of the critic variants).

Stage k reads the critic C_k as stage k+1 published it LAG = 2 steps earlier (the tables' lag rule,
pipeline/feedback_channel.py), while the stage's own weights are current. The critic moves
steadily while stage k+1 trains, so the latest two messages point where it is going. Stage k reads
the linear extrapolation instead of the message as received, as weight prediction does for stale
weights in asynchronous pipelines (PipeMare, SpecTrain):

    C_hat^(t) = C^(t-2) + lam (C^(t-2) - C^(t-3))      lam = 2 spans the lag; lam = 0: as received

From the two latest messages received; on the first steps, where only one has arrived (P_0 at
steps 1 and 2), the difference is zero and C_hat is the message. Nothing else changes: the critic's
training on stage k+1, the message and what crosses the boundary (C_hat is computed on stage k, as
data, no gradient).

Cost per step on stage k: one subtraction, one scaling and one addition over the message's
entries; it holds the previous message and C_hat, two messages beyond the inbox's. The previous
message is checkpointed with the block (its extra state), so a resumed run extrapolates exactly as
an uninterrupted one. Only refresh=1 is accepted (variant_options.py): with refresh=k the block
would see one message for k steps and could not tell a new one from the same one again.
"""

from __future__ import annotations

import torch
from torch import nn

# sub, mul, add over every entry of the message, once per step
FLOPS_PER_ENTRY = 3.0
# the previous message, kept one step beyond the inbox, and C_hat
HELD_MESSAGES = 2


class MessageExtrapolation(nn.Module):
    """Holds the previous message received; `forward(message)` returns C_hat (module docstring)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = lam
        self.previous: torch.Tensor | None = None

    @torch.no_grad()
    def forward(self, message: torch.Tensor) -> torch.Tensor:
        previous, self.previous = self.previous, message.detach()  # a reference: no one writes into it
        if previous is None:
            return message
        return message + self.lam * (message - previous.to(device=message.device, dtype=message.dtype))

    # A tensor, not a dict, so that everything that walks a state_dict's tensors (weight digests,
    # the tests' weight comparisons) walks this too; empty: no message received yet.
    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0) if self.previous is None else self.previous.cpu()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.previous = state if state.numel() else None
