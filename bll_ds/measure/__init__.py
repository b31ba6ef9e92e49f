"""Measurements the trainer itself takes and reports in summary.json: model FLOPs per stage
(flops.py), the device's matrix-product peak (matmul_peak.py), its datasheet peak where the
device is a known GPU (device_peak.py) and peak RSS (rss.py). The benchmark package (bll_bench)
builds on these; nothing here imports it."""
