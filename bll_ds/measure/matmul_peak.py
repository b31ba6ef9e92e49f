"""The matrix-product peak of this process's device, measured: the denominator of model FLOP
utilisation. Measured inside the training run (same threads, same neighbours on the machine)
rather than taken from a datasheet, because a CPU's peak depends on how its cores are shared."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from bll_ds.infra.atomic import atomic_write_text


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 1024, min_seconds: float = 0.3,
                       max_product_s: float = 0.05) -> float:
    """Best-of-repeats FLOP/s of an n x n x n product (2 n^3 FLOPs). The size grows from 128 to n
    only while one product stays under max_product_s: where a dtype is emulated (bf16 on an
    AVX2-only CPU: 0.9 GFLOP/s), a 1024-cube product takes 2.4 s, and the warm-up plus one timed
    product cost each run about 5 s per measurement; a smaller product tells that dtype's speed as well."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def product(size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: kernel selection, page faults
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        return a, b, time.perf_counter() - start

    size = min(128, n)
    a, b, elapsed = product(size)
    while size < n and elapsed * 8 < max_product_s:  # doubling the size costs 8x the time
        size *= 2
        a, b, elapsed = product(size)
    best, spent = elapsed, elapsed
    while spent < min_seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size**3 / best


def matmul_peaks(device: torch.device) -> dict[str, float]:
    """GFLOP/s in fp32 and bf16."""
    return {name: round(matmul_flops_per_s(device, dtype) / 1e9, 1)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def device_key(device: torch.device) -> str:
    """What a measured peak belongs to: the device model, the threads this process multiplies
    with, and the torch build (its kernels)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                    "unknown CPU")
        name = f"{name} x{os.cpu_count()} cores"
    return f"{name} | {device.type} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cached_matmul_peaks(device: torch.device, cache_dir: str | None) -> dict[str, float]:
    """matmul_peaks, measured once per device_key and kept in cache_dir/matmul_peaks.json. The
    entry records itself as cached (`cached: true`) when it is read back."""
    if cache_dir is None:
        return matmul_peaks(device)
    path, key = Path(cache_dir) / "matmul_peaks.json", device_key(device)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and {"fp32", "bf16"} <= set(known[key]):
        return {**known[key], "cached": True}
    peaks = matmul_peaks(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**known, key: peaks}, indent=1) + "\n")
    except OSError:
        pass  # an unwritable cache costs a measurement next time, nothing else
    return peaks


def best_of(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Per dtype, the better of two measurements (a neighbour may have shared the core in one)."""
    return {dtype: max(a[dtype], b[dtype]) for dtype in a}
