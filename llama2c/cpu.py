"""Which kernel tier libllama2 runs on this CPU, and why.

The C library picks its matrix-vector kernels when a model is opened: the best
tier the CPU (and its OS) runs, "avx512", "avx2", "neon" or the portable
"scalar" loop, or the tier the LLAMA2_KERNELS environment variable names
(portable|scalar|avx2|avx512|neon) when the CPU runs it; a forced tier it
cannot run falls back to the best one, and the reason says so. Every tier gives
bit-identical results (docs/FORWARD.md), so the tier only changes speed.

    from llama2c.cpu import kernel_info
    kernel_info()["tier"]      # e.g. "avx512"

`python -m llama2c.cpu` prints the same as text.
"""
from __future__ import annotations

import os
import platform

from ._ffi import ffi, lib

TIERS = ("portable", "scalar", "avx2", "avx512", "neon")


def _text(ptr) -> str:
    return ffi.string(ptr).decode("utf-8", "replace") if ptr != ffi.NULL else ""


def _cpu_model() -> str:
    """The CPU's marketing name where the OS says it (Linux /proc/cpuinfo), else platform's guess."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_info() -> dict:
    """The kernel tier a model opened now would run on, as a dict:

    - ``tier``: "avx512", "avx2", "neon" or "scalar" (the portable loops);
    - ``reason``: why, in words (forced by LLAMA2_KERNELS, or the best this CPU
      runs and what the better tiers lack, or the fallback from a forced tier
      this CPU cannot run);
    - ``forced``: the LLAMA2_KERNELS value, or None;
    - ``cpu_flags``: the CPU features the library's choice looked at (CPUID and
      the OS's saved register state on x86-64, HWCAP on aarch64 Linux);
    - ``machine``, ``cpu``: the architecture and the CPU's name.
    """
    return {
        "tier": _text(lib.llama2_kernels_name()),
        "reason": _text(lib.llama2_kernels_reason()),
        "forced": os.environ.get("LLAMA2_KERNELS") or None,
        "cpu_flags": _text(lib.llama2_cpu_features()).split(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
    }


def format_kernel_info(info: dict | None = None) -> str:
    """kernel_info() as a few lines of text."""
    info = kernel_info() if info is None else info
    lines = [
        f"kernel tier: {info['tier']}",
        f"why: {info['reason']}",
        f"cpu: {info['cpu']} ({info['machine']})",
        f"cpu flags seen: {' '.join(info['cpu_flags']) or '(none)'}",
    ]
    if info.get("forced"):
        lines.append(f"LLAMA2_KERNELS={info['forced']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_kernel_info())
