"""MFU as published figures state it: the datasheet peak table (bll_ds/measure/device_peak.py),
the dtype a run is measured against, and summary.json's two utilisations, with a mocked CUDA
device (no GPU here)."""

from types import SimpleNamespace

import pytest
import torch

from bll_ds.measure import device_peak
from bll_ds.measure.device_peak import datasheet_peak, datasheet_tflops, device_model, training_dtype
from bll_ds.measure.flops import stage_step_flops
from bll_ds.metrics import summary as summary_mod
from bll_ds.modeling import load_model_spec
from helpers import REPO


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA A100-SXM4-40GB", "A100"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10", "A10"),
    ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"),
    ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
    ("Tesla T4", "T4"),
    # Unknown: AWS's A10G (its own figures), a GH200, a future card, a MIG slice, no name (CPU).
    ("NVIDIA A10G", None),
    ("NVIDIA GH200 480GB", None),
    ("NVIDIA H20", None),
    ("NVIDIA B300 SXM6", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ("", None),
    (None, None),
])
def test_device_names_map_to_their_datasheet_row(name, model):
    assert device_model(name) == model


def test_dense_peaks_by_dtype():
    assert datasheet_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5  # 1,979 with sparsity, halved
    assert datasheet_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert datasheet_tflops("NVIDIA H100 NVL", "bf16") == 835.5
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert datasheet_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert datasheet_tflops("NVIDIA L4", "fp16") == 121.0
    # Volta: fp16 tensor cores only; no bf16, and tf32 products run in fp32 there.
    assert datasheet_tflops("Tesla V100-SXM2-16GB", "fp16") == 125.0
    assert datasheet_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert datasheet_tflops("Tesla V100-SXM2-16GB", "tf32") == 15.7
    assert datasheet_tflops("NVIDIA A10G", "bf16") is None and datasheet_tflops(None, "fp32") is None
    with pytest.raises(ValueError, match="fp8"):
        datasheet_tflops("NVIDIA H100", "fp8")


def test_every_row_is_dense_and_ordered():
    """Tensor-core dtypes at least the fp32 rate, and no sparse figure slipped in (H100 SXM's
    sparse bf16 is 1,979: every dense entry here is below 1,000)."""
    for model, row in device_peak.DATASHEET_TFLOPS.items():
        assert set(row) <= set(device_peak.DTYPES) and "fp32" in row, model
        assert all(row["fp32"] <= v < 1000 for v in row.values()), model


@pytest.mark.parametrize("bf16, fp16, tf32, expected", [
    (True, False, False, "bf16"), (True, False, True, "bf16"), (False, True, True, "fp16"),
    (False, False, True, "tf32"), (False, False, False, "fp32")])
def test_training_dtype(bf16, fp16, tf32, expected):
    assert training_dtype(bf16, fp16, allow_tf32=tf32) == expected


def test_training_dtype_reads_torch_tf32_setting():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # a property of torch's cuBLAS module (monkeypatch cannot restore it)
    try:
        matmul.allow_tf32 = True
        assert training_dtype(False) == "tf32"
        matmul.allow_tf32 = False
        assert training_dtype(False) == "fp32"
    finally:
        matmul.allow_tf32 = before


def test_datasheet_peak_says_why_there_is_none(monkeypatch):
    assert datasheet_peak(torch.device("cpu"), "fp32") == {
        "device_name": None, "dtype": "fp32", "tflops": None, "why_none": "no datasheet peak on cpu"}
    monkeypatch.setattr(device_peak.torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future 9000")
    assert "not in bll_ds/measure/device_peak.py's table" in datasheet_peak(torch.device("cuda"), "bf16")["why_none"]
    monkeypatch.setattr(device_peak.torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert "no bf16 peak" in datasheet_peak(torch.device("cuda"), "bf16")["why_none"]
    monkeypatch.setattr(device_peak.torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB MIG 3g.20gb")
    assert "MIG slice" in datasheet_peak(torch.device("cuda:0"), "bf16")["why_none"]


# ---- summary.json ------------------------------------------------------------------------------
MODEL = "models/test-1m.json"


def _cfg(emulate=False, method="bp"):
    return SimpleNamespace(stages=2, method=method, bll=SimpleNamespace(variant="critic-context"), emulate=emulate,
                           metrics=SimpleNamespace(throughput_warmup_steps=0), nonfinite=SimpleNamespace(policy="stop"),
                           link_delay_ms=0.0)


def _ds(bf16=True, fp16=False):
    return SimpleNamespace(bf16=bf16, config={"fp16": {"enabled": fp16}}, micro_batch_size=4, micro_batches=4,
                           data_parallel=1, steps=10, train_batch_size=16)


@pytest.fixture
def on_h100(monkeypatch):
    monkeypatch.setattr(device_peak.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")


def test_stage_mfu_against_datasheet_and_measured_peak(on_h100):
    config = load_model_spec(REPO / MODEL)
    step_s, seq_len = 0.002, 64
    flops = stage_step_flops(config, 2, seq_len, "bp", "critic-context", 4 * seq_len, 4)[1].total
    gflops = flops / step_s / 1e9
    out = summary_mod.flop_rates(_cfg(), _ds(), 1, config, seq_len, step_s, {"fp32": 50_000.0, "bf16": 700_000.0},
                                 torch.device("cuda"))
    assert out["model_gflops_per_s"] == round(gflops, 2)
    assert out["mfu"] == round(gflops / 989_500, 4)
    assert out["mfu_measured_peak"] == round(gflops / 700_000, 4)
    assert out["mfu_peaks"] == {"dtype": "bf16", "device_name": "NVIDIA H100 80GB HBM3", "datasheet_tflops": 989.5,
                                "measured_gflops": 700_000.0, "why_no_datasheet": None}
    fp32 = summary_mod.flop_rates(_cfg(), _ds(bf16=False), 1, config, seq_len, step_s, {"fp32": 50_000.0},
                                  torch.device("cuda"))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    assert fp32["mfu_peaks"]["dtype"] == ("tf32" if tf32 else "fp32")
    assert fp32["mfu"] == round(gflops / (494_500 if tf32 else 67_000), 4)
    assert fp32["mfu_measured_peak"] == round(gflops / 50_000, 4)
    fp16 = summary_mod.flop_rates(_cfg(), _ds(bf16=False, fp16=True), 1, config, seq_len, step_s,
                                  {"fp32": 50_000.0, "bf16": 700_000.0}, torch.device("cuda"))
    assert fp16["mfu"] == round(gflops / 989_500, 4) and fp16["mfu_measured_peak"] is None  # fp16 is not measured


def test_stage_mfu_on_cpu_is_the_measured_one_only():
    config = load_model_spec(REPO / MODEL)
    out = summary_mod.flop_rates(_cfg(), _ds(bf16=False), 0, config, 64, 0.01, {"fp32": 100.0, "bf16": 10.0},
                                 torch.device("cpu"))
    assert out["mfu"] is None and out["mfu_measured_peak"] is not None
    assert out["mfu_peaks"]["dtype"] == "fp32"  # a CPU has no tf32, whatever torch's cuBLAS flag says
    assert out["mfu_peaks"]["why_no_datasheet"] == "no datasheet peak on cpu"
    unmeasured = summary_mod.flop_rates(_cfg(), _ds(bf16=False), 0, config, 64, 0.01, None, torch.device("cpu"))
    assert unmeasured["mfu"] is None and unmeasured["mfu_measured_peak"] is None


class _View:
    def __init__(self, stage):
        self.stage_id, self.module, self.skipped_steps = stage, torch.nn.Linear(2, 2), 0
        self.tracer = SimpleNamespace(activation_peak_mb=1.0)
        self.accounting = SimpleNamespace(summary=lambda: {"stage": stage, "dp_rank": 0, "utilisation": 0.9})


@pytest.mark.parametrize("emulate", [False, True], ids=["launched", "emulated"])
def test_summary_reports_both_mfus_for_the_replica(monkeypatch, on_h100, emulate):
    """Launched, each stage has its own H100: the replica's mfu is its FLOP/s over two peaks.
    Emulated, the stages share one: over one peak."""
    monkeypatch.setattr(summary_mod, "_gather_objects", lambda mine: [mine])
    monkeypatch.setattr(summary_mod, "count_parameters", lambda config: 1)
    config = load_model_spec(REPO / MODEL)
    engine = SimpleNamespace(device=torch.device("cuda"), stage_views=lambda: [_View(0), _View(1)])
    peaks = {"fp32": 50_000.0, "bf16": 700_000.0}
    got = summary_mod.build_summary(_cfg(emulate), _ds(), engine, config, {0: [], 1: []}, [0.002] * 4, 64, 0, 2.0,
                                    0.0, 1.0, 1.0, peaks)
    devices = 1 if emulate else 2
    assert got["mfu"] == round(got["model_gflops_per_s"] / (devices * 989_500), 4)
    assert got["mfu_measured_peak"] == round(got["model_gflops_per_s"] / (devices * 700_000), 4)
    assert "datasheet dense bf16 peak of NVIDIA H100 80GB HBM3 (989.5 TFLOP/s)" in got["mfu_basis"]
    assert [s["mfu_peaks"]["datasheet_tflops"] for s in got["stages_detail"]] == [989.5, 989.5]
    if not emulate:  # the mean of the stages' utilisations, devices alike
        assert got["mfu"] == pytest.approx(sum(s["mfu"] for s in got["stages_detail"]) / 2, abs=1e-4)


def test_summary_on_cpu_says_why_mfu_is_null(monkeypatch):
    monkeypatch.setattr(summary_mod, "_gather_objects", lambda mine: [mine])
    monkeypatch.setattr(summary_mod, "count_parameters", lambda config: 1)
    engine = SimpleNamespace(device=torch.device("cpu"), stage_views=lambda: [_View(0), _View(1)])
    got = summary_mod.build_summary(_cfg(), _ds(bf16=False), engine, load_model_spec(REPO / MODEL), {0: [], 1: []},
                                    [0.01] * 4, 64, 0, 2.0, 0.0, 1.0, 1.0, {"fp32": 100.0, "bf16": 10.0})
    assert got["mfu"] is None and got["mfu_measured_peak"] > 0
    assert got["mfu_basis"].startswith("mfu: null, no datasheet peak on cpu; mfu_measured_peak: over the fp32")
