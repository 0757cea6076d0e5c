"""Facts about the machine and the checkout a benchmark ran on, recorded with
every table: the CPU and its SIMD flags, the load average, the git commit."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_info() -> dict:
    """CPU model, core count and the SIMD flags that matter to both engines."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                        "avx_vnni", "amx_bf16") if f in flags]
    return {"model": model, "cores": os.cpu_count(), "simd": simd,
            "avx512": any(f.startswith("avx512") for f in flags)}


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def git_commit() -> str | None:
    """The checkout's short commit (+dirty), None outside a git checkout."""
    here = Path(__file__).resolve().parents[2]
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                           text=True, timeout=10)
        if c.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return c.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
