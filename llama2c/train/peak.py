"""The peak FLOP/s that MFU is measured against: the device actually used.

- CUDA: a table of dense tensor-core peaks by device name (bf16/fp16, and TF32
  for float32 matmuls, which training enables); an unknown GPU is measured.
- CPU (and MPS): measured once per process, dtype and thread count: the best
  rate of square matmuls (1024 x 1024, the dtype autocast computes in) over a
  few short rounds. On a busy machine the measurement is lower, like the
  training speed.

``peak_flops(device_type, dtype)`` returns (FLOP/s, how it was found).
"""
from __future__ import annotations

import time
from typing import Dict, Tuple

# dense peaks in TFLOP/s: name fragment -> (bf16, fp16, tf32 / fp32)
GPU_PEAKS = {
    "h200": (989, 989, 494), "h100": (989, 989, 494), "h800": (989, 989, 494), "gh200": (989, 989, 494),
    "a100": (312, 312, 156), "a800": (312, 312, 156), "a10g": (70, 70, 35), "a10": (125, 125, 62.5),
    "a30": (165, 165, 82), "a40": (150, 150, 75), "a6000": (155, 155, 77), "l40s": (362, 362, 183),
    "l40": (181, 181, 90), "l4": (121, 121, 60), "4090": (165, 165, 82.6), "3090": (71, 71, 35.6),
    "v100": (0, 125, 15.7), "t4": (0, 65, 8.1),
}

_cache: Dict[Tuple[str, str, int], Tuple[float, str]] = {}


def gpu_table_peak(name: str, dtype: str) -> float:
    low = name.lower()
    for frag, (bf16, fp16, fp32) in GPU_PEAKS.items():
        if frag in low:
            value = {"bfloat16": bf16, "float16": fp16}.get(dtype, fp32)
            return value * 1e12 if value else 0.0
    return 0.0


def measure_matmul(device: str = "cpu", dtype: str = "float32", n: int = 1024, rounds: int = 3,
                   seconds: float = 0.15) -> float:
    """The best FLOP/s of (n x n) @ (n x n) matmuls in ``dtype`` on ``device``."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # a generator of its own: the run's random state (dropout, a resume's exact replay) is untouched
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dt)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elif device.startswith("mps"):
            torch.mps.synchronize()

    torch.matmul(a, b)
    sync()
    best = 0.0
    for _ in range(rounds):
        k, t0 = 0, time.perf_counter()
        while True:
            torch.matmul(a, b)
            k += 1
            if k % 4 == 0:
                sync()
                dt_s = time.perf_counter() - t0
                if dt_s >= seconds:
                    break
        best = max(best, 2.0 * n ** 3 * k / dt_s)
    return best


def peak_flops(device_type: str, dtype: str, device: str = "") -> Tuple[float, str]:
    """(peak FLOP/s, a few words on where it comes from) for training in
    ``dtype`` on this device."""
    import torch

    threads = torch.get_num_threads()
    key = (device or device_type, dtype, threads)
    if key in _cache:
        return _cache[key]
    if device_type == "cuda":
        name = torch.cuda.get_device_name(device or None)
        value = gpu_table_peak(name, dtype)
        if value:
            result = (value, f"{name}'s {dtype if dtype != 'float32' else 'tf32'} peak")
        else:
            value = measure_matmul(device or "cuda", dtype, n=4096)
            result = (value, f"measured {dtype} matmul on {name}")
    else:
        value = measure_matmul(device or device_type, dtype)
        where = f"{threads} thread{'s' if threads != 1 else ''}" if device_type == "cpu" else device_type
        result = (value, f"measured {dtype} matmul, {where}")
    _cache[key] = result
    return result
