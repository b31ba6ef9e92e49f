"""Two gloo ranks exercising bll_ds/pipeline/launched/link_delay.py (launched by tests/test_link_delay.py with
torchrun). Rank 0 sends five messages through every path the runs use (send, isend, a P2POp
batch as torch.distributed.pipelining builds it) with a 200 ms delay installed; rank 1 receives
them. Each rank writes what it saw to OUT/rank{r}.json; the test asserts on it."""

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bll_ds.pipeline.launched import link_delay

DELAY_MS = 200.0


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    original_send = dist.send
    link_delay.install(DELAY_MS)
    seen: dict = {"patched": dist.send is not original_send}
    dist.barrier()
    start = time.perf_counter()
    if rank == 0:
        buf = torch.zeros(4)
        dist.send(buf + 0, 1)
        works = [dist.isend(buf + 1, 1)]
        buf += 2
        dist.send(buf, 1)
        buf.fill_(-1)  # the queued copy must not see this
        ops = [dist.P2POp(dist.isend, torch.full((4,), 3.0), 1), dist.P2POp(dist.isend, torch.full((4,), 4.0), 1)]
        works += dist.batch_isend_irecv(ops)
        for work in works:
            work.wait()
        seen["send_calls_s"] = time.perf_counter() - start
    else:
        values, arrivals = [], []
        for _ in range(5):
            buf = torch.empty(4)
            dist.recv(buf, 0)
            arrivals.append(time.perf_counter() - start)
            values.append(float(buf[0]))
        seen.update(values=values, arrivals_s=arrivals)
    link_delay.uninstall()
    seen["restored"] = dist.send is original_send
    # Undelayed again: a round trip now takes far less than the delay.
    dist.barrier()
    begin = time.perf_counter()
    probe = torch.ones(1)
    if rank == 0:
        dist.send(probe, 1)
        dist.recv(probe, 1)
    else:
        dist.recv(probe, 0)
        dist.send(probe, 0)
    seen["round_trip_after_s"] = time.perf_counter() - begin
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
