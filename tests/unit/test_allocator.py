"""`keep_freed_memory`: a tensor allocated and freed over and over is faulted in once, not on
every pass, counted as the process's minor page faults in a fresh process (the setting is
process-wide). glibc only."""

import ctypes
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

LIBC = ctypes.util.find_library("c")
ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, resource, sys
import torch
from actors.allocator import keep_freed_memory

torch.set_num_threads(1)  # one allocation order
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "patcher":  # a Patcher on a CPU model keeps freed memory itself
    import tempfile
    from actors import Patcher, load_model
    from tests.tiny import save_tiny_model
    Patcher(load_model(str(save_tiny_model(tempfile.mkdtemp(), "llama", n_layers=2))))
faults = []
for _ in range(20):  # 64 MiB, above glibc's largest default mmap threshold (32 MiB)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    y = x + 1
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({"kept": kept, "faults": faults[10:]}))
"""
PAGES = (64 << 20) // 4096  # one 64 MiB tensor's pages


def probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    LIBC is None or not hasattr(ctypes.CDLL(LIBC), "mallopt"), reason="needs glibc's mallopt"
)
def faulting(passes: list[int]) -> int:
    """Passes (of the last 10) that faulted in at least a quarter of a tensor's pages."""
    return sum(f >= PAGES // 4 for f in passes)


def test_freed_tensors_are_not_faulted_in_again() -> None:
    # glibc's default: two fresh mappings per pass, faulted in page by page, every pass.
    default = probe("default")["faults"]
    assert faulting(default) == 10 and sum(default) >= 10 * PAGES, default
    # Kept: the heap's pages, reused.
    kept = probe("keep")
    assert kept["kept"] is True
    assert faulting(kept["faults"]) <= 3, kept
    # With a model loaded, an odd pass still faults a tensor in again (measured: 0-3 of 20,
    # at random passes, never in a probe without the model); most passes must not.
    patcher = probe("patcher")["faults"]
    assert faulting(patcher) <= 3, patcher
