import ctypes
import mmap
import os
import time

import pytest

from speedtune.models import prefetch


def resident_share(path) -> float:
    """The share of `path`'s pages in the page cache (Linux mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private and writable: a buffer ctypes can address
        try:
            buf = ctypes.c_char.from_buffer(mm)
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
            del buf
        finally:
            mm.close()
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec) / len(vec)


def test_the_plan_reads_ahead_only_what_fits_in_memory(tiny_model):
    files, why = prefetch.plan(tiny_model, 2**40)
    assert files == [tiny_model / "model.safetensors"] and "read ahead" in why
    files, why = prefetch.plan(tiny_model, 1024)  # weights larger than half of what is available
    assert files == [] and "available memory" in why
    assert prefetch.plan(None, 2**40) == ([], "no local model folder yet")
    assert prefetch.plan(tiny_model, None)[0] == []


def test_a_local_folder_or_nothing_without_the_network(tiny_model):
    assert prefetch.local_folder(str(tiny_model), tiny_model) == tiny_model
    assert prefetch.local_folder("smollm2-135m", None) is None  # embedded: built after the imports
    assert prefetch.local_folder("nobody-here/no-such-model", None) is None  # not in the cache, and no download


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux posix_fadvise")
def test_evicted_weights_come_back_into_the_page_cache(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(os.urandom(32 * 2**20))
    assert prefetch.evict(folder) == 32 * 2**20
    cold = resident_share(weights)
    if cold > 0.5:
        pytest.skip(f"this file system keeps the pages cached ({cold:.0%} after the eviction): nothing to show")
    files, _ = prefetch.plan(folder, prefetch.available_bytes())
    assert prefetch.start(files).wait(timeout=60) == 0
    for _ in range(100):  # the kernel's read-ahead completes after the call returns
        if resident_share(weights) > 0.9:
            break
        time.sleep(0.05)
    assert resident_share(weights) > 0.9, f"{resident_share(weights):.0%} of the weights cached after the read-ahead"
