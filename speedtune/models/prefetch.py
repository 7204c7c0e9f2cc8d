"""Reading a model's weight files into the OS page cache while the run does its imports.

`speedtune train` spends its first seconds importing torch, transformers and Unsloth (15-30 s on a GPU machine), and
the disk is idle then. The model load that follows reads every weight file. Here a small background process asks the
kernel to read the files ahead (`posix_fadvise(WILLNEED)`: the kernel reads into its cache, nothing is copied),
so the load finds them in memory instead of on a cold disk. Files already cached cost nothing. It is skipped where it
could push out memory the run needs: weights larger than half of the memory available now, or no Linux `fadvise`.
Only folders on this machine are read ahead: a hub id is prefetched only if its snapshot is already in the local
Hugging Face cache (no network here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from speedtune.models.registry import ALIASES, cached_snapshot, source_default

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
SHARE_OF_AVAILABLE = 0.5  # read ahead only weights that fit in this share of the memory available now


def weight_files(folder: Path) -> list[Path]:
    return sorted({f for g in WEIGHT_GLOBS for f in Path(folder).glob(g) if f.is_file()})


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_folder(spec: str, checked: Path | None) -> Path | None:
    """The model's folder if it is already on this machine: `checked` (speedtune.models.registry.check_model's
    answer for a local folder), or a hub id's snapshot in the local Hugging Face cache."""
    if checked is not None:
        return checked
    alias = ALIASES.get(spec)
    if alias is not None:
        if alias.embedded or source_default() != "hf":
            return None  # built from its package, or from ModelScope's cache: resolved after the imports
        spec = alias.hf_id
    return cached_snapshot(spec) if spec.count("/") == 1 else None


def plan(folder: Path | None, available: int | None) -> tuple[list[Path], str]:
    """(the files to read ahead, why): none where there is no folder, no fadvise, no memory figure or too little."""
    if folder is None:
        return [], "no local model folder yet"
    if not hasattr(os, "posix_fadvise"):
        return [], "this OS has no posix_fadvise"
    files = weight_files(folder)
    size = sum(f.stat().st_size for f in files)
    if not files:
        return [], "no weight files"
    if available is None or size > SHARE_OF_AVAILABLE * available:
        return [], (f"{size / 2**30:.1f} GB of weights against "
                    f"{'unknown' if available is None else f'{available / 2**30:.1f} GB'} of available memory")
    return files, f"{size / 2**30:.1f} GB of weights read ahead during the imports"


# The read-ahead loop, run by a bare interpreter: a thread of this process would wait for the GIL between calls while
# the imports hold it. The kernel reads at most its read-ahead window (often 128 KiB) per call, so the calls go in
# steps of that size; pages already cached make a call cost about a microsecond.
READ_AHEAD = """
import os, sys
step = 128 << 10
for f in sys.argv[1:]:
    try:
        fd = os.open(f, os.O_RDONLY)
    except OSError:
        continue
    try:
        for off in range(0, os.fstat(fd).st_size, step):
            os.posix_fadvise(fd, off, step, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
"""


def start(files: list[Path]) -> subprocess.Popen | None:
    """Ask the kernel to read `files` ahead, from a small child process that ends when the requests are made."""
    if not files:
        return None
    try:
        return subprocess.Popen([sys.executable, "-S", "-c", READ_AHEAD, *map(str, files)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:  # no process to spare: the load reads the files itself
        return None


def evict(folder: Path) -> int:
    """Drop `folder`'s weight files from the page cache (clean pages only; no privileges needed): the benchmark's
    cold start, so that every run reads its model from the disk. Returns the bytes asked to be dropped."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for f in weight_files(folder):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages can't be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return n
