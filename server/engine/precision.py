"""Whether this CPU computes in bfloat16 / float16 at full speed, measured rather than guessed.

Intel CPUs with AVX-512 BF16 or AMX run a bf16 matmul as fast as fp32 or faster; AVX2-only CPUs
(many AMD EPYC) emulate it, tens of times slower. CPU flags do not tell the whole story (oneDNN's
ISA can be capped by `ONEDNN_MAX_CPU_ISA`, torch's kernels by `ATEN_CPU_CAPABILITY`), so the one
check everything goes through - the server's start-up warning, `make bench`, the bench smoke
tests - times a small matmul in both dtypes (~0.2 s of CPU on a slow CPU, once per process).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

# A dtype is "native" on this CPU when its matmul is at most this many times slower than fp32
# (measured ratios: ~0.3-1.5 with AVX-512 BF16 / AMX, ~50-80 with AVX2 only).
NATIVE_MAX_SLOWDOWN = 4.0
_PROBE_SIZE = 256


@dataclass(frozen=True)
class CpuPrecision:
    """How `dtype` compares with float32 on this CPU."""

    dtype: str
    cpu_capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    slowdown: float  # matmul time in `dtype` / in float32, same shapes

    @property
    def is_native(self) -> bool:
        return self.slowdown <= NATIVE_MAX_SLOWDOWN

    def reason(self) -> str:
        """One line for logs and reports: why this dtype is (not) used at full speed here."""
        speed = f"a {self.dtype} matmul runs {self.slowdown:.1f}x the time of float32"
        if self.is_native:
            return f"{speed} on this CPU ({self.cpu_capability}): native"
        return f"{speed} on this CPU ({self.cpu_capability}, no native {self.dtype})"


def _matmul_seconds(dtype: torch.dtype, repeats: int) -> float:
    """CPU time of one matmul on one thread: other processes on a shared machine do not count."""
    a, b = (torch.ones(_PROBE_SIZE, _PROBE_SIZE, dtype=dtype) for _ in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)  # warm-up: oneDNN builds its kernel on first use
        best = float("inf")
        for _ in range(repeats):
            started = time.thread_time()
            torch.mm(a, b)
            best = min(best, time.thread_time() - started)
    finally:
        torch.set_num_threads(threads)
    return max(best, 1e-6)


@functools.cache
def cpu_precision(dtype: torch.dtype) -> CpuPrecision:
    """Measured once per process and dtype."""
    if dtype == torch.float32:
        slowdown = 1.0
    else:  # an emulated matmul takes tens of ms: fewer repeats
        slowdown = _matmul_seconds(dtype, 3) / _matmul_seconds(torch.float32, 10)
    name = str(dtype).removeprefix("torch.")
    return CpuPrecision(name, torch.backends.cpu.get_cpu_capability(), round(slowdown, 2))


def needs_fallback(dtype: torch.dtype, device: torch.device | str) -> CpuPrecision | None:
    """The measurement when computing in `dtype` on `device` would be emulated (slow) here, else
    None: CUDA, float32 and CPUs with native support need nothing."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return None
    precision = cpu_precision(dtype)
    return None if precision.is_native else precision


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The `machine` block every benchmark result carries, so that runs from different CPUs are
    never compared by accident."""
    bf16 = cpu_precision(torch.bfloat16)
    return {
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": bf16.cpu_capability,
        "native_bf16": bf16.is_native,
        "bf16_matmul_slowdown": bf16.slowdown,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def describe(info: dict[str, Any]) -> str:
    """`machine_info()` in one line for reports."""
    native = "native bf16" if info["native_bf16"] else f"no native bf16 ({info['bf16_matmul_slowdown']}x)"
    return (
        f"{info['cpu_model']}, {info['cpu_capability']}, {native}, {info['cpus']} CPUs, "
        f"torch {info['torch']}, {info['threads']} threads"
    )
