"""The matrix-product peak measurement (bll_ds/measure/matmul_peak.py) stays short where a dtype is
slow: the product grows from 128 only while one product takes under max_product_s."""

from __future__ import annotations

import time

import pytest
import torch

from bll_ds.measure import matmul_peak


def test_a_slow_dtype_is_measured_on_a_small_product(monkeypatch):
    sizes = []

    def slow_mm(a, b):  # an emulated dtype: 10 ms for a 256-cube product, 2.4 s would be 1024
        sizes.append(a.shape[0])
        time.sleep(0.01 * (a.shape[0] / 256) ** 3)
        return a

    monkeypatch.setattr(matmul_peak.torch, "mm", slow_mm)
    start = time.perf_counter()
    flops = matmul_peak.matmul_flops_per_s(torch.device("cpu"), torch.float32, min_seconds=0.1)
    assert time.perf_counter() - start < 1.0
    assert max(sizes) == 256  # 256 -> 512 would take 80 ms a product, over the 50 ms cap
    assert flops == pytest.approx(2 * 256**3 / 0.01, rel=0.3)


def test_a_fast_dtype_still_reaches_the_full_size(monkeypatch):
    sizes = []
    monkeypatch.setattr(matmul_peak.torch, "mm", lambda a, b: sizes.append(a.shape[0]) or a)
    matmul_peak.matmul_flops_per_s(torch.device("cpu"), torch.float32, n=1024, min_seconds=0.001)
    assert max(sizes) == 1024


def test_the_peaks_are_measured_once_per_device_and_kept(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(matmul_peak, "matmul_peaks", lambda device: measured.append(device) or {"fp32": 80.0, "bf16": 40.0})
    cpu = torch.device("cpu")
    assert matmul_peak.cached_matmul_peaks(cpu, str(tmp_path)) == {"fp32": 80.0, "bf16": 40.0}
    assert matmul_peak.cached_matmul_peaks(cpu, str(tmp_path)) == {"fp32": 80.0, "bf16": 40.0, "cached": True}
    assert len(measured) == 1
    threads = torch.get_num_threads()
    try:  # another thread count is another measurement
        torch.set_num_threads(threads + 1)
        matmul_peak.cached_matmul_peaks(cpu, str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert len(measured) == 2
    (tmp_path / "matmul_peaks.json").write_text("{damaged")
    matmul_peak.cached_matmul_peaks(cpu, str(tmp_path))
    assert len(measured) == 3
