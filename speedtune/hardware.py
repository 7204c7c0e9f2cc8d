"""What the machine is, and the precision to train and run in, chosen from the hardware (never a blind bf16)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str
    dtype: str  # "bfloat16", "float16" or "float32"
    why: str
    memory_gb: float | None = None


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def detect(prefer: str | None = None) -> Hardware:
    """The device and precision. CUDA: bf16 where supported (Ampere and newer), else fp16 (T4, V100).
    CPU: fp32 unless it has AMX bf16 units; measured on a 2-core AMD EPYC with avx512_bf16 but no AMX, a bf16
    training step was 15x slower than fp32 (53 s against 3.5 s)."""
    import torch

    if prefer != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        mem = torch.cuda.get_device_properties(0).total_memory / 2**30
        if torch.cuda.is_bf16_supported():
            return Hardware("cuda", name, "bfloat16", "the GPU supports bf16", mem)
        return Hardware("cuda", name, "float16", "the GPU has no bf16 (T4/V100 class): fp16", mem)
    if "amx_bf16" in cpu_flags():
        return Hardware("cpu", _cpu_name(), "bfloat16", "the CPU has AMX bf16 units")
    return Hardware("cpu", _cpu_name(), "float32", "the CPU has no AMX bf16 units: bf16 would be ~15x slower than fp32")


def matmul_tflops(dtype: str = "bfloat16", n: int = 4096, reps: int = 20) -> float | None:
    """The GPU's measured dense matmul rate (TFLOP/s) in `dtype`; None without a GPU. About 5 ms on an H200, 60 ms
    on a T4. The fit uses it to weigh a pass's fixed cost against its tokens; the benchmarks report MFU against it."""
    import time

    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch_dtype(dtype))
    b = torch.randn(n, n, device="cuda", dtype=torch_dtype(dtype))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
