"""Memory for weights: what decoding streams, and what a checkpoint's mapped file no longer needs.

    streamed_empty(shape, dtype)   torch.empty in 2 MiB pages where Linux allows, for weights decoding streams
    release_file_pages(tensor)     a mapped checkpoint tensor's pages out of this process once it is copied
    read_ahead(tensor)             a mapped checkpoint tensor's pages read into memory in the background

A decode step reads every weight once. From 4 KiB pages, the page-table walks slow that stream measurably; a
huge page covers 512 times as much memory per translation. Only weights built for decoding use it (fused
projections, int8 and int4 weights and their scales), never the dtype conversions of loading: faulting
in 2 MiB pages, which the kernel may first have to compact, makes a load slower.
"""

import ctypes
import functools
import math
import mmap
import sys

import torch

# Linux's transparent huge pages: 2 MiB, requested per range with madvise(MADV_HUGEPAGE) (<sys/mman.h>),
# which is what a system set to THP "madvise" (the common default) needs before it uses them for a range.
HUGE_PAGE = 2 * 2**20
PAGE = 4096


@functools.cache
def _madvise():
    """libc's madvise on Linux, else None."""
    if sys.platform != "linux":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def streamed_empty(shape: tuple[int, ...], dtype: torch.dtype, device=None) -> torch.Tensor:
    """torch.empty for a weight that decoding will stream, its pages 2 MiB where the OS allows.

    On a Linux CPU, from HUGE_PAGE bytes: memory of its own, a private anonymous mapping aligned to 2 MiB and
    marked MADV_HUGEPAGE before anything touches it (unmapped when the tensor is freed). torch.empty's memory
    would often not take the hint: the C allocator serves blocks below its mapping threshold (which grows to
    32 MiB as large blocks are freed, as quantizing a checkpoint does) from memory used before, whose pages
    are 4 KiB already. Only a hint still: where the kernel has no huge page to give, pages stay 4 KiB.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    on_cpu = torch.device(torch.get_default_device() if device is None else device).type == "cpu"
    if not on_cpu or nbytes < HUGE_PAGE or sys.platform != "linux":
        return torch.empty(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    handle = ctypes.c_char.from_buffer(region)
    offset = -ctypes.addressof(handle) % HUGE_PAGE
    del handle  # a live export would keep the mapping from ever being closed
    region.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    # The tensor holds `region` (a buffer export) until its storage is freed: then the mapping goes too.
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


MADV_WILLNEED = 3
MADV_DONTNEED = 4


def _file_mapping(address: int) -> bool:
    """Whether `address` lies in a private mapping of a file (/proc/self/maps: a path, private)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) == 6 else ""
                return path.startswith("/") and fields[1].endswith("p")
    return False


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Drop a memory-mapped checkpoint tensor's pages from this process once its data has been copied or
    quantized: the whole pages inside its bytes stop counting in the resident memory (the OS keeps them in
    its page cache, and reads them again from the file should anything touch them). Returns whether it did.

    For a tensor read from a checkpoint (a private mapping of its file) that nothing has written to: its
    pages are then clean copies of the file, and released they lose nothing. The loader calls it right
    after reading, before anything can write to a weight. Anything that is not a file mapping (anonymous
    memory, where releasing would zero the data) is left alone.
    """
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or tensor.nbytes < 2 * PAGE:
        return False
    start = -(-tensor.data_ptr() // PAGE) * PAGE
    end = (tensor.data_ptr() + tensor.nbytes) // PAGE * PAGE
    if end <= start or not _file_mapping(start):
        return False
    return madvise(start, end - start, MADV_DONTNEED) == 0


def read_ahead(tensor: torch.Tensor) -> bool:
    """Ask the OS to read a memory-mapped checkpoint tensor's pages now, in the background, rather than one
    page fault at a time when they are first touched (each a disk read once the file has left the page
    cache). They stay pages of the file: they count in the resident memory only once touched, and the OS may
    drop them again. Returns whether it asked; anything that is not a file mapping is left alone."""
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or tensor.nbytes < PAGE:
        return False
    start = tensor.data_ptr() // PAGE * PAGE
    if not _file_mapping(start):
        return False
    return madvise(start, tensor.data_ptr() + tensor.nbytes - start, MADV_WILLNEED) == 0
