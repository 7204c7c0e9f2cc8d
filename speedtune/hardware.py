"""What the machine is, and the precision to train and run in, chosen from the hardware (never a blind bf16)."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from speedtune import paths


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

    return platform.processor() or "cpu"


def detect(prefer: str | None = None) -> Hardware:
    """The device and precision. CUDA: bf16 where supported (Ampere and newer), else fp16 (T4, V100).
    CPU: fp32 unless it has AMX bf16 units (without them bf16 trains far slower: docs/design/training.md)."""
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
    """The GPU's measured dense matmul rate (TFLOP/s) in `dtype`; None without a GPU. The fit uses it to weigh a pass's
    fixed cost against its tokens; the benchmarks report MFU against it. Measured once per GPU model, torch version,
    dtype and size on this machine, then read from the speedtune cache ($SPEEDTUNE_HOME/cache/matmul-tflops.json): the
    probe starts CUDA and runs ~20 products (~5 ms on an H200, ~60 ms on a T4, plus their warm-up)."""
    import torch

    if not torch.cuda.is_available():
        return None
    key = f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | {dtype} | {n}"
    path = paths.home() / "cache" / "matmul-tflops.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    rate = measure_matmul_tflops(dtype, n, reps)
    try:  # atomic: another run may be reading it
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: rate}, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache: measured again next time
    return rate


def measure_matmul_tflops(dtype: str = "bfloat16", n: int = 4096, reps: int = 20) -> float:
    import torch

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


ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # torch >= 2.9 reads the first, older ones the second


def configure_allocator() -> str:
    """Expandable segments for PyTorch's CUDA caching allocator: a segment grows and shrinks in place instead of new
    blocks of each size, so less memory stays reserved beyond what is allocated (the varying pass widths of packed
    rows fragment fixed segments). Read when CUDA starts, so set before that (speedtune.training.train: before torch is
    imported); a setting the user made is kept, and a machine without an NVIDIA driver is left alone. Returns what
    is in force, for the plan's reasons."""
    mine = "expandable_segments:True"
    for var in ALLOC_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]} (set before speedtune)"
    if not Path("/proc/driver/nvidia").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return "the allocator's defaults (no NVIDIA driver seen)"  # a CPU machine: nothing to set
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the allocator's defaults (CUDA had started before speedtune could set expandable segments)"
    for var in ALLOC_VARS:
        os.environ[var] = mine
    return f"{ALLOC_VARS[0]}={mine} (set by speedtune; yours wins if you set it)"


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
