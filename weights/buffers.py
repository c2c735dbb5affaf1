"""Memory for weights that decoding streams: `streamed_empty`, torch.empty in 2 MiB pages where Linux allows.

A decode step reads every weight once. From 4 KiB pages, the page-table walks slow that stream measurably
(the README's int8 rows come from weights in 2 MiB pages); a huge page covers 512 times as much memory per
translation. Only weights built for decoding use it (fused projections, int8 weights), never the dtype
conversions of loading: faulting in 2 MiB pages, which the kernel may first have to compact, makes a load
slower.
"""

import ctypes
import functools
import sys

import torch

# Linux's transparent huge pages: 2 MiB, requested per range with madvise(MADV_HUGEPAGE) (<sys/mman.h>),
# which is what a system set to THP "madvise" (the common default) needs before it uses them for a range.
HUGE_PAGE = 2 * 2**20
MADV_HUGEPAGE = 14


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

    Only a hint: where the kernel refuses it or the memory was touched already, the pages stay 4 KiB. The
    tensor must not have been written yet (pages are chosen when first touched).
    """
    tensor = torch.empty(shape, dtype=dtype, device=device)
    madvise = _madvise()
    if tensor.device.type == "cpu" and madvise is not None and tensor.nbytes >= 2 * HUGE_PAGE:
        # the whole 2 MiB pages inside the allocation
        start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (tensor.data_ptr() + tensor.nbytes) // HUGE_PAGE * HUGE_PAGE
        madvise(start, end - start, MADV_HUGEPAGE)
    return tensor
