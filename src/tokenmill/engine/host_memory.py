"""Host memory for the CPU engine: large freed blocks kept for the next step, and huge pages for the big reads.

A step at 64 sequences makes tensors of 3-13 MB (a step's logits, the MLP's activations). glibc maps
blocks that large fresh and unmaps them when freed, so each step touches them again through a page
fault per 4 KiB. Measured here (SmolLM2, 64 streams of 256 -> 128 tokens, engine alone, two
alternated pairs): 303 / 314 output tok/s as glibc ships against 348 / 347 with these thresholds
raised, for ~110 MB more resident memory. Process-wide, so the engine sets it once at load.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import mmap

import torch

log = logging.getLogger(__name__)

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # blocks below 32 MiB (glibc's most) come from the heap, reused once freed
    (M_TRIM_THRESHOLD, 1 << 30),  # free memory at the heap's top is given back only past 1 GiB
    (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB at a time
)


def keep_freed_memory() -> bool:
    """Apply SETTINGS through glibc's mallopt; False where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    log.debug("allocator thresholds %s", "raised" if applied else "left as they were")
    return applied


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor on memory advised for transparent huge pages, touched now so its resident size never grows.

    For the KV pool: the decode kernel reads 4 KiB blocks scattered over hundreds of MB, a TLB miss each on
    4 KiB pages; on 2 MiB pages SmolLM2's 64-stream decode over 30 layers went 67.7 -> 59.9 ms (7 rounds,
    median, 2-core Zen 3). Not for the packed weights: each is its own mapping, whose last huge page is
    mostly empty (+228 MB resident for SmolLM2), and a one-row step was no faster (26.5 ms a step either
    way). Where the kernel has no THP, or it is off, this is a plain mapping.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    # private and anonymous (a shared mapping is shmem, which THP's madvise mode leaves alone), zero-filled,
    # a huge page longer so that the tensor can start on a huge page boundary; the tensor keeps it alive
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP compiled out: 4 KiB pages it is
        mapping.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE_PAGE
    tensor = whole[skip : skip + nbytes].view(dtype).view(shape)
    tensor.zero_()  # fault every page in now (and through the huge pages), not in the middle of a step
    return tensor
