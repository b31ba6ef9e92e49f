"""What every driver of a stage (launched or emulated, backprop or block-local) records per
optimizer step, and the two per-step rules they share: the step's seed and the update norm."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """What one stage saw in one optimizer step."""
    step: int              # 1-based index of the completed step
    loss: float            # this stage's loss: the LM loss on the last stage (BP: everywhere)
    step_s: float
    busy_s: float
    idle_s: float
    lr: float
    grad_norm: float | None = None
    update_norm: float | None = None  # ||theta_after - theta_before||, on tracked steps only
    terms: dict = field(default_factory=dict)
    nonfinite: str | None = None  # why the update was skipped (pipeline/nonfinite.py), None if applied


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of `rank` during optimizer step `step` (1-based). Reseeding every step from
    (seed, step, rank) makes dropout exactly reproducible after a resume without saving RNG
    states; the emulator gives each stage the stream of the rank that would run it."""
    return seed * 1_000_003 + step * 1009 + rank


def snapshot(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 copies of the weights the optimizer updates (in bf16 runs, the fp32 masters)."""
    return [w.detach().float().clone() for w in weights]


def update_norm(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """||theta_after - theta_before|| over the optimizer's weights. Measured over the fp32
    masters, not the bf16 copies, which also move by their rounding."""
    return sum(float((a.detach().float() - b).pow(2).sum()) for a, b in zip(after, before)) ** 0.5
