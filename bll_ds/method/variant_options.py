"""Cheaper local readouts and target tables: options a variant takes after its name.

At a real vocabulary (V = 32k-128k) a non-last stage's full-vocabulary readout costs 6 H V FLOPs
per token per head, about two thirds of a llama-7b decoder layer, and a target table is V x H
values per hop per step. The options cut both, and are written after the variant's name, so that
every tool that takes a variant (--bll_variant, sweep --variants, bench compare's `bll:VARIANT`,
the simulator, the planner, `bench variants`) takes them too:

    --bll_variant dgl-context:dim=64:neg=2048
    --bll_variant prototype:dim=64:neg=2048:table=bf16:refresh=4

    option      default  meaning                                               variants
    ---------   -------  ----------------------------------------------------  -----------------
    dim=r       0 (= H)  the readout (and table) live in r dimensions:          cross-entropy
                         z = P_k norm(h), P_k [r, H] owned by the stage;        readouts: dgl,
                         logits = z W_k^T with W_k [V, r] (dgl) or m_k [V, r]   dgl-context,
                         (prototype: the last stage sends W_out R, R a fixed    prototype (and
                         orthonormal [H, r] projection; P_k starts as R^T;      their -aux forms),
                         critic: P_k and the table are the received critic's;  critic(-context)
                         r >= H: the full readout, so one spec fits any model)
    neg=n       0 (all)  shared-candidate softmax: the micro-batch's distinct   the same
                         targets plus n negatives drawn uniformly from the
                         rest of the vocabulary, with the sampling correction
                         (`shared_candidates`); cost scales with n + targets
    table=bf16  (model)  the table's dtype on the wire and in the inbox          table variants,
                                                                                critic(-context)
    refresh=k   1        the table travels every k steps (lag rule below)       the same
    guard=w     1.0      the collapse guard's weight lambda (docs/METHOD.md)    gaussian,
                                                                                bernoulli
    variance=   fixed    the message variances s_a^2, s_b^2: fixed at 1/2, or  gaussian
      learned            learned (log-parametrised)
    mu=m        0.9      the moving average's momentum (0: the latest copy)    -man variants
    affine=0|1  1        the learned scale and shift in front of the average   -man variants
    labels=a    0.5      the labels' share of the critic's target, beside the  critic variants
                         stage's own prediction (1 - a): critic.py
    extrap=lam  0        the received critic extrapolated over its lag from    critic variants
                         the two latest messages, C + lam (C - C_prev)        (refresh=1)
                         (message_extrapolation.py; 0: as received)

Every option of a variant is written here and nowhere else (there are no --bll_* flags for them).

Lag rule with refresh=k (bll_ds/pipeline/feedback_channel.py): stage k+1 publishes after its
optimizer steps j = 0, k, 2k, ...; stage k uses during step t the table published after step
k * floor(max(t - LAG, 0) / k), so a table is at most LAG + k - 1 steps old. Both sides derive
the index from the step alone, so a resumed run consumes exactly the tables of an uninterrupted
one (tests/test_variant_options.py).

The sampled softmax. Let T be the micro-batch's distinct targets and S a uniform sample without
replacement of n items from the other V - |T| (each included with probability p = n / (V - |T|)).
Each token's loss is the cross-entropy over T and S with the logits of S raised by log(1/p):

    L_t = -o_y + log( sum_{v in T} e^{o_v} + sum_{v in S} e^{o_v} / p )

The sum inside the log is an unbiased estimate of the full partition function Z (E over S of
sum_S e^{o_v}/p = sum_{v not in T} e^{o_v}); the loss, a log of it, is biased low by Jensen's
inequality, E[L_t] <= -log q(y | h), and the bias vanishes as n -> V - |T| (exact at n >= V - |T|).
tests/test_variant_options.py checks both by enumerating every sample on a tiny vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

IGNORE = -100
TABLE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class VariantOptions:
    """What follows a variant's name; the defaults are the plain variant."""
    dim: int = 0            # readout width r (0: the model's hidden size)
    neg: int = 0            # shared negatives per micro-batch (0: the full-vocabulary softmax)
    table: str = ""         # the table's dtype on the wire ("": the model's training dtype)
    refresh: int = 1        # steps between tables sent upstream
    guard: float = 1.0      # the collapse guard's weight (gaussian, bernoulli)
    variance: str = "fixed"  # the gaussian messages' variances: "fixed" or "learned"
    mu: float = 0.9         # the -man average's momentum (0: the latest copy as sent)
    affine: int = 1         # the -man readout's learned scale and shift in front of the average (0: none)
    labels: float = 0.5     # the critic's target: the labels' share a, beside the stage's prediction (critic variants)
    extrap: float = 0.0     # the received critic read as C + lam (C - C_prev) (critic variants; 0: as received)

    def set_names(self) -> tuple[str, ...]:
        """The options that differ from the defaults, in declaration order."""
        default = VariantOptions()
        return tuple(f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name))

    def suffix(self) -> str:
        return "".join(f":{name}={_spelled(getattr(self, name))}" for name in self.set_names())


def _spelled(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_WORDS = {"table": tuple(TABLE_DTYPES), "variance": ("fixed", "learned")}  # options spelled as words
# options that are real numbers: the values they take, and how an error says so
_REALS = {"guard": (lambda w: w >= 0, ">= 0"), "mu": (lambda w: 0 <= w < 1, "in [0, 1)"),
          "labels": (lambda w: 0 <= w <= 1, "in [0, 1]"), "extrap": (lambda w: w >= 0, ">= 0")}


def parse_spec(spec: str) -> tuple[str, VariantOptions]:
    """"dgl-context:dim=64:neg=2048" -> ("dgl-context", VariantOptions(dim=64, neg=2048))."""
    name, *parts = spec.split(":")
    options = VariantOptions()
    known = {f.name: f for f in fields(VariantOptions)}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in known:
            raise ValueError(f"BLL variant {spec!r}: cannot read option {part!r}; options are written "
                             f"NAME:key=value with key one of {tuple(known)} (e.g. dgl-context:dim=64:neg=2048)")
        if key in _WORDS:
            if value not in _WORDS[key]:
                raise ValueError(f"BLL variant {spec!r}: {key}={value} is not one of {_WORDS[key]}")
            options = replace(options, **{key: value})
            continue
        if key in _REALS:
            accepts, allowed = _REALS[key]
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not accepts(weight):
                raise ValueError(f"BLL variant {spec!r}: {key}={value} must be a number {allowed}")
            options = replace(options, **{key: weight})
            continue
        try:
            number = int(value)
        except ValueError:
            number = -1
        if number < (1 if key == "refresh" else 0) or (key == "affine" and number > 1):
            raise ValueError(f"BLL variant {spec!r}: {key}={value} must be a whole number "
                             f"{'>= 1' if key == 'refresh' else '0 or 1' if key == 'affine' else '>= 0'}")
        options = replace(options, **{key: number})
    if options.extrap and options.refresh != 1:
        raise ValueError(f"BLL variant {spec!r}: extrap= extrapolates from consecutive messages and needs "
                         f"refresh=1; drop one of the two options")
    return name, options


def run_name(spec: str) -> str:
    """A file-name-friendly form of a variant spec: dgl-context:dim=64 -> dgl-context-dim64."""
    return spec.replace(":", "-").replace("=", "")


@torch.no_grad()
def fixed_projection(hidden: int, width: int) -> torch.Tensor:
    """R [hidden, width] with orthonormal columns, the same on every stage and every run: how the
    last stage brings its output embedding into a reduced readout's width."""
    generator = torch.Generator().manual_seed(20230524 + 1009 * hidden + width)
    q, _ = torch.linalg.qr(torch.randn(hidden, width, generator=generator))
    return q


def readout_logits(z: torch.Tensor, operand: torch.Tensor, candidates: "Candidates | None") -> torch.Tensor:
    """z operand^T over the vocabulary, or over the candidates with the sampling correction (only
    their rows of the operand are multiplied)."""
    if candidates is None:
        return z @ operand.t()
    return z @ operand[candidates.ids].t() + candidates.log_weight.to(z.dtype)


class Candidates:
    """A micro-batch's shared softmax candidates: ids [C] (its distinct targets first, then the
    sampled negatives), log_weight [C] (0 for targets, log(1/p) for negatives) and a map from
    vocabulary ids to positions in ids."""

    def __init__(self, ids: torch.Tensor, log_weight: torch.Tensor, vocab_size: int):
        self.ids, self.log_weight = ids, log_weight
        self._position = torch.full((vocab_size + 1,), IGNORE, dtype=torch.long, device=ids.device)
        self._position[ids] = torch.arange(ids.numel(), device=ids.device)

    def __len__(self) -> int:
        return self.ids.numel()

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [..., V] -> the candidates' [..., C], negatives raised by log(1/p)."""
        return logits[..., self.ids] + self.log_weight.to(logits.dtype)

    def position(self, labels: torch.Tensor) -> torch.Tensor:
        """labels in candidate positions; IGNORE stays IGNORE (it indexes the map's spare last slot)."""
        return self._position[torch.where(labels == IGNORE, self._position.numel() - 1, labels)]


def shared_candidates(labels: torch.Tensor, vocab_size: int, negatives: int,
                      generator: torch.Generator | None = None) -> Candidates:
    """The distinct targets of `labels` (IGNORE left out) and `negatives` items drawn uniformly
    without replacement from the rest of the vocabulary (all of them when fewer remain)."""
    targets = torch.unique(labels[labels != IGNORE])
    is_target = torch.zeros(vocab_size, dtype=torch.bool, device=labels.device)
    is_target[targets] = True
    rest = (~is_target).nonzero().squeeze(1)
    n = min(negatives, rest.numel())
    order = torch.randperm(rest.numel(), generator=generator, device="cpu" if generator is not None else labels.device)
    sampled = rest[order[:n].to(rest.device)]
    log_weight = torch.zeros(targets.numel() + n, device=labels.device)
    if n:
        log_weight[targets.numel():] = math.log(rest.numel() / n)
    return Candidates(torch.cat([targets, sampled]), log_weight, vocab_size)
