"""Process-wide settings for CPU training: keep freed memory in the process (glibc's malloc).

glibc's malloc gives every block above its mmap threshold (128 KiB, raised as blocks are freed up
to 32 MiB at most) its own ``mmap`` and returns it to the kernel when it is freed, and it trims the
top of the heap once 2x that threshold is free. A training step allocates and frees its
activations and gradients afresh, so each step page-faults them back in and the kernel zeroes
every page again. Measured on the 2-core VM, one forward+backward of an ``ssd`` block at 28x28
tokens (batch 64, width 128, one thread) spent 931 of its 2,110 ms of CPU time in the kernel,
634,836 minor page faults a step; with the heap kept, 30 of 1,255 ms and 2,509 faults (attention:
1,164 and 1,197 ms). ``bench/mixer_speed.py --malloc glibc`` measures the mixers the old way.

PyTorch's CPU performance tuning guide (pytorch.org, "Performance Tuning Guide": "Switch Memory
allocator") recommends an allocator that keeps memory, jemalloc or TCMalloc, preloaded before the
process starts. ``mallopt(3)`` gets glibc's own allocator to do the same from inside a running
process: blocks up to ``block_limit`` (64 MiB) come from the heap (no ``mmap``) and up to ``limit``
(1 GiB) of free heap is kept (no trim). ``HYBRID_NAS_MALLOC=glibc`` in the environment keeps
glibc's defaults.

The cost is resident memory, and it is what sets ``block_limit``. A staged ``nas search`` on the
50,000 CIFAR-10 training images (``bench/stream_search_rss.py``, streaming, 6cpu-m) peaked at
1,525 MB in its largest Ray worker with every block below 1 GiB taken from the heap, against
1,410 MB with glibc's defaults: the heap kept the worker's few blocks above 64 MiB and fragmented
around them. With blocks up to 32 MiB it peaked at 1,438 MB (one run), up to 64 MiB at 1,448 and
1,461 MB (two runs). 64 MiB keeps the page faults away up to a (64, 784, 256) float32 activation (51 MB: an
``ssd`` block at 28x28 tokens, batch 64, width 128: 621,159 faults a step with glibc's defaults,
15,686 with 1 GiB, 12,528 with 64 MiB; 32 MiB gave its 28x28 speed-up back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: the environment variable that opts out (value ``glibc``)
MALLOC_ENV = "HYBRID_NAS_MALLOC"
#: bytes of free heap kept (no trim below this)
RETAIN_BYTES = 1 << 30
#: a block this large or smaller comes from the heap; larger ones keep their own mmap (module docstring)
HEAP_BLOCK_BYTES = 64 << 20

_applied: tuple[int, int] | None = None
_libc: ctypes.CDLL | bool | None = None  # glibc once loaded; False where there is none


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (loaded once), else None: off Linux, or musl, whose
    ``mallopt`` does nothing and which has no ``malloc_trim``."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.gnu_get_libc_version  # noqa: B018 - only glibc has it
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc or None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel now (glibc ``malloc_trim``), whatever
    :func:`retain_freed_memory` keeps between steps: for a long-lived process between jobs. No-op
    without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def retain_freed_memory(limit: int = RETAIN_BYTES, block_limit: int = HEAP_BLOCK_BYTES) -> bool:
    """Make glibc's malloc take blocks up to ``block_limit`` bytes from the heap and keep up to
    ``limit`` freed bytes in the process instead of handing them back to the kernel (module
    docstring). Returns whether it took effect: False off Linux, on a C library other than glibc
    (musl), where ``mallopt`` refuses the values, or when ``HYBRID_NAS_MALLOC`` is ``glibc``. Safe to
    call again."""
    global _applied
    if _applied == (limit, block_limit):
        return True
    libc = _glibc()
    if libc is None or limit <= 0 or block_limit <= 0 or os.environ.get(MALLOC_ENV) == "glibc":
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trim, block = (min(v, 2**31 - 1) for v in (limit, block_limit))  # mallopt takes an int
    if not (mallopt(_M_MMAP_THRESHOLD, block) and mallopt(_M_TRIM_THRESHOLD, trim)):
        return False
    _applied = (limit, block_limit)
    return True
