"""Peak rates of common GPUs and the roofline floor of a stage: max(FLOPs / peak FLOP/s, bytes / peak B/s).

Peaks are the vendors' dense (no sparsity) datasheet numbers; measured attainable rates are lower (the design
doc measured 758 TFLOP/s for a bf16 GEMM and 588 for cuDNN attention on an H100 SXM). `detect()` matches the
running GPU by name; unknown GPUs get no floor rather than a guessed one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Peak:
    name: str
    bf16_tflops: float     # dense tensor-core bf16 with fp32 accumulate
    fp8_tflops: float
    hbm_tbps: float        # memory bandwidth, TB/s

    def floor_ms(self, flops: float, nbytes: float, fp8: bool = False) -> float:
        rate = (self.fp8_tflops if fp8 else self.bf16_tflops) * 1e12
        return 1e3 * max(flops / rate, nbytes / (self.hbm_tbps * 1e12))


PEAKS = {
    "H100 SXM": Peak("H100 SXM", 989.0, 1979.0, 3.35),
    "H100 PCIe": Peak("H100 PCIe", 756.0, 1513.0, 2.0),
    "H200": Peak("H200", 989.0, 1979.0, 4.8),
    "A100": Peak("A100 80GB SXM", 312.0, 0.0, 2.04),
    "RTX 4090": Peak("RTX 4090", 165.2, 330.3, 1.01),
}


def detect(device_name: str | None = None) -> Peak | None:
    """The peak table row for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    if device_name is None:
        import torch
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    if "H200" in name:
        return PEAKS["H200"]
    if "H100" in name:
        return PEAKS["H100 PCIe"] if "PCIE" in name else PEAKS["H100 SXM"]
    if "A100" in name:
        return PEAKS["A100"]
    if "4090" in name:
        return PEAKS["RTX 4090"]
    return None
