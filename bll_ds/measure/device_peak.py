"""The datasheet's dense peak of an NVIDIA datacenter GPU, per training dtype: the denominator
published MFU figures use (PaLM, Megatron-LM, torchtitan), so summary.json's `mfu` can be set
beside theirs. matmul_peak.py's measured peak stays the denominator of `mfu_measured_peak`: on a
CPU, or a GPU this table does not know, it is the only one there is.

Figures are TFLOP/s without structured sparsity: where a datasheet prints only the 2:4-sparse
tensor-core figure (marked * below), the dense one is half of it; where it prints the dense one
too (A100, L40S: 362.05 beside 733*), that one is taken as printed. Sources, each checked
against the NVIDIA datasheet or product page of the card:
  H100 SXM / PCIe / NVL, H200 SXM / NVL: nvidia.com/en-us/data-center/h100/ and .../h200/
      (H100 SXM = H200 SXM: BF16 1,979*, TF32 989*, FP32 67; H100 PCIe: BF16 1,513*, TF32 756*,
      FP32 51; H100 NVL = H200 NVL: BF16 1,671*, TF32 835*, FP32 60), and the Hopper whitepaper's
      dense H100 SXM5 table (989.4 BF16, 494.7 TF32).
  A100 (SXM4 and PCIe, 40 and 80 GB alike): nvidia.com/en-us/data-center/a100/ (BF16 312,
      TF32 156, FP32 19.5).
  A10: nvidia.com/en-us/data-center/products/a10-gpu/ (BF16 250*, TF32 125*, FP32 31.2).
  A30: nvidia.com/en-us/data-center/products/a30-gpu/ (BF16 330*, TF32 165*, FP32 10.3).
  A40: the A40 datasheet (BF16 299.4*, TF32 149.6*, FP32 37.4).
  L40S / L40: the L40S and L40 datasheets (L40S: BF16 362.05 | 733*, TF32 183 | 366*, FP32 91.6;
      L40: BF16 362.1*, TF32 181*, FP32 90.5).
  L4: nvidia.com/en-us/data-center/l4/ (BF16 242*, TF32 120*, FP32 30.3).
  V100: the V100 datasheet (tensor cores run FP16 only: SXM2 125 / FP32 15.7, PCIe 112 / 14,
      V100S PCIe 130 / 16.4); no BF16 or TF32 in hardware.
  T4: the T4 datasheet (FP16 tensor 65, FP32 8.1); no BF16 or TF32.
A card not listed here (or a MIG slice, which has a fraction of the SMs) has no datasheet
figure: its MFU is None and summary.json says why.
"""

from __future__ import annotations

import re

import torch

DTYPES = ("bf16", "fp16", "tf32", "fp32")

# TFLOP/s, dense. A dtype a card cannot run on its tensor cores is absent (V100 and T4: bf16).
DATASHEET_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "A30": {"bf16": 165.0, "fp16": 165.0, "tf32": 82.5, "fp32": 10.3},
    "A40": {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100 SXM2": {"fp16": 125.0, "fp32": 15.7},
    "V100 PCIe": {"fp16": 112.0, "fp32": 14.0},
    "V100S PCIe": {"fp16": 130.0, "fp32": 16.4},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}

# torch.cuda.get_device_name() -> table row, first match wins. Names as the driver reports them,
# e.g. "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-32GB", "Tesla V100S-PCIE-32GB".
# Word boundaries keep "A10" from matching "A100" or the A10G (AWS's own part, its own figures).
_NAMES: list[tuple[str, str]] = [
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIE\b", "H100 PCIe"),
    (r"\bH100\b.*(\bSXM|\bHBM3)|^NVIDIA H100$", "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b(?!.*\bNVL\b)", "H200 SXM"),
    (r"\bA100\b", "A100"),
    (r"\bA10$", "A10"),
    (r"\bA30$", "A30"),
    (r"\bA40$", "A40"),
    (r"\bL40S$", "L40S"),
    (r"\bL40$", "L40"),
    (r"\bL4$", "L4"),
    (r"\bV100S\b.*\bPCIE\b", "V100S PCIe"),
    (r"\bV100\b.*\bSXM2\b", "V100 SXM2"),
    (r"\bV100\b.*\bPCIE\b", "V100 PCIe"),
    (r"\bT4$", "T4"),
]


def device_model(name: str | None) -> str | None:
    """The table row for a CUDA device name, or None: unknown, CPU (no name), or a MIG slice."""
    if not name:
        return None
    upper = " ".join(name.upper().split())
    if " MIG " in f" {upper} ":  # e.g. "NVIDIA H100 80GB HBM3 MIG 1g.10gb": a fraction of the card
        return None
    for pattern, model in _NAMES:
        if re.search(pattern, upper):
            return model
    return None


def datasheet_tflops(name: str | None, dtype: str) -> float | None:
    """Dense datasheet peak of the named device in `dtype` (one of DTYPES), TFLOP/s, or None.
    tf32 on a card without it (V100, T4) falls back to fp32: cuBLAS runs those products in fp32."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    model = device_model(name)
    if model is None:
        return None
    row = DATASHEET_TFLOPS[model]
    if dtype == "tf32" and "tf32" not in row:
        dtype = "fp32"
    return row.get(dtype)


def training_dtype(bf16: bool, fp16: bool = False, allow_tf32: bool | None = None) -> str:
    """The dtype whose peak bounds the run's matrix products: bf16 or fp16 as the DeepSpeed
    config enables them, else tf32 where torch lets cuBLAS use it for fp32 products
    (torch.backends.cuda.matmul.allow_tf32, which torch.set_float32_matmul_precision("high")
    also sets), else fp32."""
    if bf16:
        return "bf16"
    if fp16:
        return "fp16"
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    return "tf32" if allow_tf32 else "fp32"


def device_name(device: torch.device) -> str | None:
    """torch's name for a CUDA device; None on any other device (a CPU has no datasheet here)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def datasheet_peak(device: torch.device, dtype: str) -> dict:
    """What summary.json records about the datasheet denominator: the device's name, the dtype,
    the dense peak in TFLOP/s, and why it is None where it is."""
    name = device_name(device)
    tflops = datasheet_tflops(name, dtype)
    if tflops is not None:
        why = None
    elif name is None:
        why = f"no datasheet peak on {torch.device(device).type}"
    elif " MIG " in f" {name.upper()} ":
        why = f"{name!r} is a MIG slice; the card's datasheet peak does not apply"
    elif device_model(name) is None:
        why = f"{name!r} is not in bll_ds/measure/device_peak.py's table"
    else:
        why = f"{name!r} has no {dtype} peak on its datasheet"
    return {"device_name": name, "dtype": dtype, "tflops": tflops, "why_none": why}
