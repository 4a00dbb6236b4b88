"""Keep freed host memory in the process, so that a forward's activations are not faulted in
anew on every pass (CPU only; glibc).

glibc's malloc serves a request above its mmap threshold (128 KiB, rising as blocks are freed to
at most 32 MiB) with a fresh mapping, and hands freed memory at the top of its heap back to the
kernel once more than its trim threshold is free. A patching pass allocates and frees
activations of megabytes in every layer, so on a CPU most of them arrive as new pages that the
kernel faults in and zeroes one by one: at the binding-tiny shape on 2 cores that was a third
of the engine's time (the peers, with smaller tensors, gain little from the setting;
`bench/peers.py` sets it for every tool alike).

`keep_freed_memory` serves allocations up to `limit` from the heap and keeps up to `limit` freed
bytes in the process. The price: the process's resident memory stays near its peak rather than
shrinking after each pass. CUDA memory is untouched (PyTorch's caching allocator already keeps
it). Elsewhere than glibc (macOS, musl) it does nothing and returns False.
"""

import ctypes
import ctypes.util
import functools

from actors.budget import CPU_BUDGET

LIMIT = CPU_BUDGET  # bytes: as much as one CPU pass may hold
M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def keep_freed_memory(limit: int = LIMIT) -> bool:
    """Set glibc's mmap and trim thresholds to `limit` bytes for this process; True when set."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))


def release_free_memory() -> None:
    """Hand the memory malloc keeps free back to the kernel now (glibc `malloc_trim`), e.g. to
    measure from a resident size that counts only what is in use."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
