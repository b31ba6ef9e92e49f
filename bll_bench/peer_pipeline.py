"""Peer arms: PyTorch's own pipeline schedules (torch.distributed.pipelining) on the project's model.

A peer arm trains exactly what `--method bp` trains -- the same HF blocks cut the same way
(`layer_specs`, each layer built after `torch.manual_seed(seed + i)` as `build_sequential` and
DeepSpeed's `seed_layers` do), the same micro-batches (`MicroBatchSampler.get`), the same loss
(`lm_loss`), the DeepSpeed config's optimizer and LR schedule as torch objects
(`build_optimizer` / `build_scheduler`, with `weight_decay_groups`) and DeepSpeed's clipping by
the global gradient norm -- but the pipeline is run by one of torch's schedules:

    name                  class                          stages per rank  placement
    1f1b                  Schedule1F1B                   1                rank r: stage r
    interleaved-1f1b      ScheduleInterleaved1F1B        2                loop: r, r + N
    interleaved-zb        ScheduleInterleavedZeroBubble  2                loop: r, r + N
    zbv                   ScheduleZBVZeroBubble          2                V: r, 2N - 1 - r
    dualpipev             ScheduleDualPipeV              2                V: r, 2N - 1 - r

Per optimizer step (`PeerArm.train_step`): the first stage's rank passes the M micro-batches'
inputs concatenated along the batch dimension, the last stage's rank their labels; the schedule
splits them back into the same M micro-batches, runs forward/backward with `lm_loss` per
micro-batch and (scale_grads=True, torch's default) divides the accumulated gradients by M, so
the gradient is that of the mean loss over micro-batches, as DeepSpeed's PipelineEngine computes
it. Then the squared gradient norms are all-reduced over the ranks, gradients are scaled by
min(1, clip / (norm + 1e-6)) (DeepSpeed's fp32 clip), and the optimizer and scheduler step.

One-step check (what tests/test_peer_pipeline.py launches on 2 gloo ranks):

    torchrun --nproc_per_node 2 --master_port 29800 -m bll_bench.peer_pipeline \
        --model models/test-1m.json --vocab_size 64 --ds_config ds_configs/test-1m.json \
        --schedules 1f1b,zbv --out /tmp/peer

writes OUT/<schedule>/rank<r>.pt (this rank's parameters after one step, the gradients before
clipping, the global norm, and `PeerArm.evaluate`'s loss on the same batches after the step) or OUT/<schedule>/error.txt (the exception, identical on every rank
for a schedule that fails on construction). `reference_step` is the single-process autograd
step those are compared with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bll_ds.data import MicroBatchSampler
from bll_ds.infra.cli_types import DefaultsHelpFormatter
from bll_ds.modeling.layers import lm_loss
from bll_ds.modeling.pipeline import build_sequential, build_stage_layers
from bll_ds.pipeline.build import weight_decay_groups
from bll_ds.pipeline.emulated.emulated_stage import build_optimizer, build_scheduler


@dataclass(frozen=True)
class PeerSchedule:
    name: str
    class_name: str
    stages_per_rank: int
    placement: str  # "loop" (stage s on rank s % N) or "v" (rank r: stages r and 2N - 1 - r)


PEER_SCHEDULES = {s.name: s for s in (
    PeerSchedule("1f1b", "Schedule1F1B", 1, "loop"),
    PeerSchedule("interleaved-1f1b", "ScheduleInterleaved1F1B", 2, "loop"),
    PeerSchedule("interleaved-zb", "ScheduleInterleavedZeroBubble", 2, "loop"),
    PeerSchedule("zbv", "ScheduleZBVZeroBubble", 2, "v"),
    PeerSchedule("dualpipev", "ScheduleDualPipeV", 2, "v"),
)}


def rank_stages(schedule: PeerSchedule, rank: int, world: int) -> list[int]:
    """The pipeline stages `rank` holds, in increasing order."""
    if schedule.stages_per_rank == 1:
        return [rank]
    if schedule.placement == "v":
        return sorted({rank, 2 * world - 1 - rank})
    return [rank + k * world for k in range(schedule.stages_per_rank)]


def build_stage_module(config, seed: int, stages: int, stage: int) -> nn.Sequential:
    """The stage's layers (modeling.pipeline.build_stage_layers). Children are named by their
    position in the whole model, so state_dict keys match build_sequential's."""
    module = nn.Sequential()
    for i, layer in build_stage_layers(config, stages, stage, seed):
        module.add_module(str(i), layer)
    return module


def _schedule_class(schedule: PeerSchedule):
    import torch.distributed.pipelining as pipelining
    return getattr(pipelining, schedule.class_name)


class PeerArm:
    """One rank's share of a torch.distributed.pipelining peer arm (process group initialized)."""

    def __init__(self, schedule: str | PeerSchedule, config, ds_config: dict, seed: int,
                 micro_batches: int, device: torch.device | str = "cpu", group=None):
        from torch.distributed.pipelining import PipelineStage

        self.schedule_spec = PEER_SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = torch.device(device)
        self.micro_batches = micro_batches
        self.num_stages = self.world * self.schedule_spec.stages_per_rank
        self.stage_ids = rank_stages(self.schedule_spec, self.rank, self.world)
        self.modules = nn.ModuleList(build_stage_module(config, seed, self.num_stages, s).to(self.device)
                                     for s in self.stage_ids)
        self.stages = [PipelineStage(m, s, self.num_stages, self.device, group=group)
                       for m, s in zip(self.modules, self.stage_ids)]
        self.has_first = 0 in self.stage_ids
        self.has_last = self.num_stages - 1 in self.stage_ids
        cls = _schedule_class(self.schedule_spec)
        stages = self.stages[0] if self.schedule_spec.stages_per_rank == 1 else self.stages
        # scale_grads=True (the default, spelled out): gradients / M, i.e. the mean-loss gradient.
        self.schedule = cls(stages, n_microbatches=micro_batches, loss_fn=lm_loss, scale_grads=True)
        self.params = [p for p in self.modules.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(weight_decay_groups(self.modules), ds_config)
        self.scheduler = build_scheduler(self.optimizer, ds_config)
        self.clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
        self.group = group
        self.hidden_size = config.hidden_size
        self.last_grads: dict[str, torch.Tensor] | None = None
        self.last_norm: float | None = None

    def named_parameters(self):
        return [(name, p) for module in self.modules for name, p in module.named_parameters()]

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        """One schedule.step over the M micro-batches; the mean loss on the last stage's rank."""
        if len(batches) != self.micro_batches:
            raise ValueError(f"expected {self.micro_batches} micro-batches, got {len(batches)}")
        for p in self.params:
            p.grad = None
        args = (torch.cat([x for x, _ in batches]).to(self.device),) if self.has_first else ()
        target = torch.cat([y for _, y in batches]).to(self.device) if self.has_last else None
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None,
                           return_outputs=False)
        if self.has_last:
            return float(torch.stack([loss.detach().float() for loss in losses]).mean())
        return None

    def global_grad_norm(self) -> torch.Tensor:
        """DeepSpeed's clip_grad_norm_ norm: squared per-parameter norms summed per rank, then
        all-reduced over the pipeline."""
        grads = [p.grad for p in self.params if p.grad is not None]
        local = (torch.stack([g.detach().float().norm(2) for g in grads]).pow(2).sum().float()
                 if grads else torch.zeros((), device=self.device))
        local = local.reshape(1)
        dist.all_reduce(local, group=self.group)
        return local.sqrt().squeeze(0)

    def optimizer_step(self) -> float:
        norm = self.global_grad_norm()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.clip > 0 and grads:
            coefficient = torch.minimum(torch.tensor(1.0), torch.tensor(self.clip) / (norm + 1e-6))
            torch._foreach_mul_(grads, coefficient)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return float(norm)

    def owner(self, stage: int) -> int:
        """The rank that holds pipeline stage `stage`."""
        return next(r for r in range(self.world) if stage in rank_stages(self.schedule_spec, r, self.world))

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean held-out loss of the whole network, on every rank. Not through the schedule (its
        state stays untouched, and every arm is evaluated by the same code): each rank runs its
        stages in order, each over all batches, receiving inputs from the previous stage's owner
        and sending outputs (isend) to the next one's. Stage-major, so ranks overlap: with the V
        placement a batch-major walk would leave rank 0 idle while rank 1 runs stages 1 and 2."""
        modules = dict(zip(self.stage_ids, self.modules))
        last_owner = self.owner(self.num_stages - 1)
        held = [x.to(self.device) for x, _ in batches]  # this rank's current activation per batch
        pending, total = [], torch.zeros(1, dtype=torch.float64)
        for s in self.stage_ids:
            src = self.owner(s - 1) if s else self.rank
            dst = self.owner(s + 1) if s + 1 < self.num_stages else self.rank
            for i, (x, y) in enumerate(batches):
                if src != self.rank:
                    held[i] = torch.empty(*x.shape, self.hidden_size, device=self.device)
                    dist.recv(held[i], src, group=self.group)
                held[i] = modules[s](held[i])
                if s == self.num_stages - 1:  # logits: scored at once, never all kept
                    total += float(lm_loss(held[i], y.to(self.device)))
                    held[i] = None
                elif dst != self.rank:
                    out = held[i].contiguous()
                    pending.append((dist.isend(out, dst, group=self.group), out))
        for work, _ in pending:
            work.wait()
        dist.broadcast(total, src=last_owner, group=self.group)
        return float(total) / len(batches)

    def train_step(self, batches, keep_grads: bool = False) -> tuple[float | None, float]:
        """(mean loss on the last stage's rank else None, global grad norm before clipping)."""
        loss = self.forward_backward(batches)
        if keep_grads:
            self.last_grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()
                               if p.grad is not None}
        norm = self.optimizer_step()
        self.last_norm = norm
        return loss, norm


def reference_step(config, ds_config: dict, seed: int,
                   batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Plain single-process autograd on build_sequential(config, seed): gradient of the mean
    loss over the micro-batches (accumulated micro-batch by micro-batch), DeepSpeed's global-norm clip, one AdamW + scheduler step."""
    model = build_sequential(config, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(weight_decay_groups(model), ds_config)
    scheduler = build_scheduler(optimizer, ds_config)
    # One backward per micro-batch of loss / M, accumulating into .grad: DeepSpeed's gradient
    # accumulation (and the same summation order as the pipeline's; with M a power of two the
    # 1/M scaling is exact, so scaling before or after the sum gives the same bits).
    losses = []
    for x, y in batches:
        loss = lm_loss(model(x), y)
        (loss / len(batches)).backward()
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.stack([p.grad.detach().float().norm(2) for p in params]).pow(2).sum().sqrt()
    clip = float(ds_config.get("gradient_clipping", 0.0) or 0.0)
    if clip > 0:
        coefficient = torch.minimum(torch.tensor(1.0), torch.tensor(clip) / (norm + 1e-6))
        torch._foreach_mul_([p.grad for p in params], coefficient)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()},
                grads=grads, norm=float(norm), loss=float(loss.detach()), lr=lr)


def fixed_batches(vocab_size: int, seq_len: int, micro_batch_size: int, micro_batches: int,
                  seed: int, step: int = 0, tokens: int = 4096) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of optimizer step `step` from MicroBatchSampler over a fixed random
    token stream (the one-step check's data; a real arm uses the run's token stream)."""
    stream = np.random.default_rng(seed).integers(0, vocab_size, size=tokens, dtype=np.int64)
    sampler = MicroBatchSampler(stream, seq_len, micro_batch_size, seed)
    return [sampler.get(step, m, micro_batches) for m in range(micro_batches)]


def _init_gloo(timeout_s: float) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))


def one_step_check(args) -> int:
    """Each schedule in args.schedules: build the arm, one optimizer step, save this rank's
    results (or the error) under args.out/<schedule>/."""
    from bll_ds.modeling import load_model_spec

    _init_gloo(args.timeout_s)
    rank = dist.get_rank()
    config = load_model_spec(args.model, vocab_size=args.vocab_size)
    ds_config = json.loads(Path(args.ds_config).read_text()) if not args.ds_config.lstrip().startswith("{") \
        else json.loads(args.ds_config)
    micro_batch_size = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
    batches = fixed_batches(config.vocab_size, args.seq_len, micro_batch_size, args.micro_batches, args.seed)
    for name in args.schedules.split(","):
        folder = Path(args.out) / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            arm = PeerArm(name, config, ds_config, args.seed, args.micro_batches)
            loss, norm = arm.train_step(batches, keep_grads=True)
            eval_loss = arm.evaluate(batches)  # the held-out path, on the stepped weights
            torch.save(dict(stages=arm.stage_ids, loss=loss, norm=norm, eval_loss=eval_loss,
                            params={n: p.detach().clone() for n, p in arm.named_parameters()},
                            grads=arm.last_grads), folder / f"rank{rank}.pt")
        except Exception as err:  # recorded, not raised: the other schedules still run
            text = f"{type(err).__name__}: {err}"
            (folder / f"error_rank{rank}.txt").write_text(text + "\n\n" + traceback.format_exc())
            if rank == 0:
                (folder / "error.txt").write_text(text)
        dist.barrier()
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bll_bench.peer_pipeline", formatter_class=DefaultsHelpFormatter,
                                     description="torch.distributed.pipelining peer arms: one-step check, one "
                                                 "process per rank (torchrun --nproc_per_node N -m bll_bench.peer_pipeline ...)")
    parser.add_argument("--model", required=True, help="model spec (HF config JSON), e.g. models/test-1m.json")
    parser.add_argument("--vocab_size", type=int, default=None,
                        help="vocabulary size in place of the spec's (default: the spec's)")
    parser.add_argument("--ds_config", required=True, help="a DeepSpeed config file, or inline JSON")
    parser.add_argument("--schedules", default=",".join(PEER_SCHEDULES),
                        help="comma-separated torch schedules to check, each in turn")
    parser.add_argument("--micro_batches", type=int, default=4, help="micro-batches M of the one step")
    parser.add_argument("--seq_len", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the fixed batches")
    parser.add_argument("--timeout_s", type=float, default=60.0, help="gloo process group timeout, seconds")
    parser.add_argument("--out", required=True,
                        help="folder: OUT/<schedule>/rank<r>.pt per rank, or OUT/<schedule>/error.txt")
    return one_step_check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
