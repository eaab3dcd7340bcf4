"""The C heap, where torch's CPU tensors live: returning free pages to the system and choosing which buffers get
pages of their own. glibc only (ctypes); everything here is a no-op elsewhere.

glibc serves buffers below its mmap threshold from reusable heap blocks and the rest from pages of their own,
returned to the system when freed. The threshold adapts upwards (to 32 MB) as a program frees large buffers, so
a load that reads and frees many tensors of ever-new sizes ends up holding freed blocks between live ones. The
low-memory loaders pin it at 1 MB: layer-by-layer quantizing (for the load, `own_pages`) and block streaming
(for the rest of the process, `keep_own_pages`).
"""

from __future__ import annotations

import contextlib
from functools import cache

M_MMAP_THRESHOLD = -3  # mallopt's parameter number
ADAPTED = 32 << 20  # where glibc's adaptive threshold ends in a torch process
_kept = ADAPTED  # the threshold outside an own_pages block


@cache
def _libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both or neither)
    except (OSError, AttributeError):
        return None
    return libc


def trim() -> None:
    """Give the heap's free pages back to the system."""
    if _libc() is not None:
        _libc().malloc_trim(0)


def _threshold(nbytes: int) -> None:
    if _libc() is not None:
        _libc().mallopt(M_MMAP_THRESHOLD, nbytes)


def keep_own_pages() -> None:
    """From now on, for the whole process, buffers of 1 MB or more get pages of their own."""
    global _kept
    _kept = 1 << 20
    _threshold(_kept)


@contextlib.contextmanager
def own_pages():
    """Buffers of 1 MB or more get pages of their own inside the block; yields `trim`. Afterwards the threshold
    goes back to what the process keeps (32 MB, or 1 MB once something streams)."""
    _threshold(1 << 20)
    try:
        yield trim
    finally:
        _threshold(_kept)
