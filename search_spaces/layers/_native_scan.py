"""Mamba's selective scan and Mamba-2's SSD scan as native code on a CPU (``_selective_scan.c``),
built on first use.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces": their CUDA
kernel keeps each channel's state in registers and recomputes the states in the backward pass.
The C file does the same on a CPU, by tiles of 16 channels of one sample (see its header), for
Mamba's scan and for Mamba-2's (Dao & Gu 2024, "Transformers are SSMs"), step by step. It
needs only a C compiler: no PyTorch headers, no ninja; it is called through ``ctypes`` on the
tensors' memory, which releases the GIL, so several threads can scan parts of a batch at once.

The library is compiled once per source, flags and CPU (``-march=native``) into
``$HYBRID_NAS_CACHE`` (default ``~/.cache/hybrid_nas``, or a folder in the temporary directory
where the home cannot be written), written to a temporary name and renamed,
so processes that build it at the same time do not see each other's half-written file.
``make install`` builds it; a process that finds none builds it then (about a second).
Without a compiler, or with ``HYBRID_NAS_NATIVE_SCAN=0`` in the environment, ``available()``
is False and the pure-PyTorch scans (``_selective_scan.py``, ``_ssd.py``) run instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("_selective_scan.c")
FLAGS = ("-O3", "-ffast-math", "-fopenmp-simd", "-march=native", "-fPIC", "-shared", "-std=c11")
#: channels per tile and the largest state size the C file holds (its W and SMAX)
TILE, MAX_STATE = 16, 64
ENV = "HYBRID_NAS_NATIVE_SCAN"
CACHE_ENV = "HYBRID_NAS_CACHE"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_work = threading.local()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's pool threads (a pool inherited as it is would take
    work and never run it) and may inherit the lock held: both start afresh. The loaded library
    stays valid."""
    global _lock, _pool, _pool_size
    _lock, _pool, _pool_size = threading.Lock(), None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_f = ctypes.POINTER(ctypes.c_float)
_i = ctypes.c_int


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name"))}))
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def library_path() -> Path:
    """Where the library for this source, these flags and this CPU lives (built or not)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    return _cache_root() / f"selective_scan_{key}.so"


def _cache_root() -> Path:
    """``$HYBRID_NAS_CACHE``, else ``~/.cache/hybrid_nas``, else (a home that cannot be written) a
    per-user folder in the temporary directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home = Path.home() / ".cache" / "hybrid_nas"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"hybrid_nas-{os.getuid()}"


def build() -> Path:
    """Compile the library if it is not there yet; its path. Raises RuntimeError with the
    compiler's message if there is no compiler or it fails."""
    path = library_path()
    if path.exists():
        return path
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        out = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{cc} failed: {out.stderr.strip()[:500]}")
        os.replace(tmp, path)  # atomic: a process loading it sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get(ENV, "1") == "0":
            return None
        try:
            lib = ctypes.CDLL(str(build()))
        except (OSError, RuntimeError) as exc:
            warnings.warn(f"native scans unavailable, using the PyTorch scans: {exc}", stacklevel=3)
            return None
        lib.scan_forward.argtypes = [_i, _i, _i, _i, _i, _i, _f, _f, _f, _f, _f, _f]
        lib.scan_backward.argtypes = [_i, _i, _i, _i, _i, _i, _f, _f, _f, _f, _f, _f, _f, _f, _f, _f, _f, _f]
        lib.ssd_forward.argtypes = [_i] * 8 + [_f] * 8
        lib.ssd_backward.argtypes = [_i] * 8 + [_f] * 13
        for fn in (lib.scan_forward, lib.scan_backward, lib.ssd_forward, lib.ssd_backward):
            fn.restype = None
        _lib = lib
        return lib


def available() -> bool:
    """Whether the native scan can run here (builds and loads it on the first call)."""
    return _load() is not None


def supports(u: Tensor, A: Tensor, state: int | None = None) -> bool:
    """Whether these inputs go to the native scan: float32 on a CPU, a state of at most 64
    (Mamba's A is (D, S); for SSD give ``state``, B's last size)."""
    s = A.shape[1] if state is None else state
    return u.device.type == "cpu" and u.dtype == torch.float32 and s <= MAX_STATE and available()


def _ptr(t: Tensor) -> ctypes._Pointer:
    return ctypes.cast(t.data_ptr(), _f)


def _parts(bsz: int) -> list[tuple[int, int]]:
    """Samples split over ``torch.get_num_threads()`` threads, as evenly as they go."""
    n = max(1, min(bsz, torch.get_num_threads()))
    cuts = [bsz * i // n for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n)]


def _run(fn, parts: list[tuple[int, int]]) -> None:
    """``fn(b0, b1)`` for every part, on a thread each when there are several."""
    global _pool, _pool_size
    if len(parts) == 1:
        fn(*parts[0])
        return
    with _lock:
        if _pool is None or _pool_size < len(parts):
            _pool, _pool_size = ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="scan"), len(parts)
    for f in [_pool.submit(fn, *p) for p in parts]:
        f.result()


def _scratch(numel: int) -> Tensor:
    """A float32 work buffer of at least ``numel`` elements, kept per thread between calls (a fresh
    one would come as new memory pages, and their faults, every call)."""
    buf = getattr(_work, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _work.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, reverse: bool = False) -> Tensor:
    """``y`` (batch, N, D) for float32 CPU inputs u, delta (batch, N, D), A (D, S), B, C (batch, N, S);
    ``reverse``: scanned from the last token to the first."""
    lib = _load()
    assert lib is not None
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    at = A.detach().T.contiguous()
    bsz, n, d = u.shape
    s = A.shape[1]
    y = torch.empty_like(u)
    args = (n, d, s, int(reverse), _ptr(u), _ptr(delta), _ptr(at), _ptr(B), _ptr(C), _ptr(y))
    _run(lambda b0, b1: lib.scan_forward(b0, b1, *args), _parts(bsz))
    return y


def backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, gy: Tensor,
             reverse: bool = False) -> tuple[Tensor, ...]:
    """(du, ddelta, dA, dB, dC) of ``forward``'s y for its gradient ``gy``."""
    lib = _load()
    assert lib is not None
    u, delta, B, C, gy = (t.contiguous() for t in (u, delta, B, C, gy))
    at = A.detach().T.contiguous()
    bsz, n, d = u.shape
    s = A.shape[1]
    gu, gdelta = torch.empty_like(u), torch.empty_like(u)
    gB, gC = torch.empty_like(B), torch.empty_like(C)
    parts = _parts(bsz)
    gA = torch.zeros(len(parts), s, d)  # one (S, D) sum per thread, added up after
    args = (n, d, s, int(reverse), _ptr(u), _ptr(delta), _ptr(at), _ptr(B), _ptr(C), _ptr(gy), _ptr(gu), _ptr(gdelta))
    work = (4 * n + 1) * s * TILE

    def part(b0: int, b1: int) -> None:
        i = parts.index((b0, b1))
        lib.scan_backward(b0, b1, *args, _ptr(gA[i]), _ptr(gB), _ptr(gC), _ptr(_scratch(work)))

    _run(part, parts)
    return gu, gdelta, gA.sum(0).T.contiguous(), gB, gC


def _opt(t: Tensor | None) -> ctypes._Pointer | None:
    return None if t is None else _ptr(t)


def ssd_forward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, skip: Tensor | None, acc: Tensor | None,
                shift: bool, reverse: bool) -> Tensor:
    """Mamba-2's scan step by step (the C file's second half): x (b, n, h, p), dt (b, n, h), A (b, h),
    B, C (b, n, s), skip (b, n, h) or None, acc (b, n, h, p) or None, all float32, contiguous, on a
    CPU -> y (b, n, h, p), as ``_ssd.ssd_chunked``."""
    lib = _load()
    assert lib is not None
    bsz, n, h, p = x.shape
    y = torch.empty_like(x)
    args = (n, h, p, B.shape[-1], int(reverse), int(shift), _ptr(x), _ptr(dt), _ptr(A), _ptr(B), _ptr(C),
            _opt(skip), _opt(acc), _ptr(y))
    _run(lambda b0, b1: lib.ssd_forward(b0, b1, *args), _parts(bsz))
    return y


def ssd_backward(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, skip: Tensor | None, gy: Tensor,
                 shift: bool, reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, ddt, dA (b, h), dB, dC, dskip (b, n, h) or None) of ``ssd_forward``'s y for ``gy``
    (the gradient of acc is gy itself)."""
    lib = _load()
    assert lib is not None
    bsz, n, h, p = x.shape
    s = B.shape[-1]
    gy = gy.contiguous()
    gx, gB, gC = torch.empty_like(x), torch.empty_like(B), torch.empty_like(C)
    gdt, gA = torch.zeros_like(dt), torch.zeros_like(A)
    gskip = None if skip is None else torch.zeros_like(skip)
    args = (n, h, p, s, int(reverse), int(shift), _ptr(x), _ptr(dt), _ptr(A), _ptr(B), _ptr(C), _opt(skip),
            _ptr(gy), _ptr(gx), _ptr(gdt), _ptr(gA), _opt(gskip), _ptr(gB), _ptr(gC))
    work = (3 * n + 1) * s * TILE + n
    _run(lambda b0, b1: lib.ssd_backward(b0, b1, *args, _ptr(_scratch(work))), _parts(bsz))
    return gx, gdt, gA, gB, gC, gskip


def main() -> None:
    """``make install``: build the library now rather than in the first process that scans. Not an
    install error if it cannot be built: the PyTorch scan runs instead."""
    try:
        print(f"native scans (ssm, ssd, hydra on CPU): {build()}")
    except (OSError, RuntimeError) as exc:
        print(f"native scans not built ({exc}); the PyTorch scans will run")
