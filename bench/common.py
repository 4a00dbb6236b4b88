"""What the patching benchmarks share: models at the shapes they time, the programs, the
machine's matmul rate, and peak memory.

Shapes: `tiny` (a random 4-layer, d_model-256 Llama, char-level tokenizer), `binding-tiny` (the
model this project trained) and the real published configs in `bench/configs/` (random
weights; `--layers` cuts a config to its first layers, vocabulary kept full size). Every model
gets the project's char-level tokenizer: token ids then use a few rows of a real vocabulary, and
the embedding and readout keep their real sizes.
"""

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors.allocator import keep_freed_memory, release_free_memory  # noqa: E402
from actors.arch import arch_map  # noqa: E402
from actors.loading import LoadedModel, load_model, resolve_device  # noqa: E402
from actors.targets import encode_program  # noqa: E402
from models.tokenizer import build_char_tokenizer  # noqa: E402
from orchestrator.tasks import generate  # noqa: E402
from tests.tiny import save_tiny_model  # noqa: E402

CONFIGS = ROOT / "bench" / "configs"
SHAPES = ("tiny", "binding-tiny", *sorted(p.stem for p in CONFIGS.glob("*.json")))
DEFAULT_LAYERS = {"llama-3.1-8b": 4, "qwen3-8b": 4}  # the 8B configs cut to 4 layers


def build(shape: str, dtype: str = "float32", device: str = "cpu", layers: int | None = None):
    """A `LoadedModel` of `shape` (see the module docstring)."""
    torch_dtype = getattr(torch, dtype)
    if shape == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_tiny_model(Path(tmp) / "llama", "llama", n_layers=4, d_model=256)
            return load_model(str(folder), dtype=dtype, device=device)
    if shape == "binding-tiny":
        return load_model(str(ROOT / "models" / "binding-tiny"), dtype=dtype, device=device)
    raw = json.loads((CONFIGS / f"{shape}.json").read_text())
    layers = layers or DEFAULT_LAYERS.get(shape)
    if layers:
        raw["num_hidden_layers"] = layers
        if "max_window_layers" in raw:
            raw["max_window_layers"] = layers
    config = AutoConfig.for_model(**raw)
    dev = resolve_device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    # Saved and loaded back, as a hub tokenizer would be (TransformerLens reloads it by path).
    folder = tempfile.mkdtemp(prefix="bench-tokenizer-")
    build_char_tokenizer().save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return LoadedModel(
        name=f"{shape} (random weights)",
        model=model,
        tokenizer=tokenizer,
        arch=arch_map(model),
        device=dev,
        quantization="none",
        weight_bytes=model.get_memory_footprint(),
    )


def describe(lm: LoadedModel) -> str:
    cfg = lm.model.config
    params = sum(p.numel() for p in lm.model.parameters())
    return (
        f"{lm.name}: {lm.arch.n_layers} layers, d_model {lm.arch.d_model}, {lm.arch.n_heads} "
        f"heads x {lm.arch.d_head}, vocab {cfg.vocab_size}, {params / 1e6:.0f}M parameters, "
        f"{next(lm.model.parameters()).dtype}, {lm.device}"
    )


def programs(n: int, seq_len: int = 16, start: int = 0) -> list:
    """`n` binding programs of `seq_len` lines in the paper's format (seed 0)."""
    return [generate("binding", 0, seq_len, i, style="paper") for i in range(start, start + n)]


def pairs(lm: LoadedModel, progs: list) -> list:
    out = [encode_program(lm.tokenizer, p) for p in progs]
    assert all(not hasattr(p, "reason") for p in out), out
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 7):
    """The machine's matrix-multiply rate (FLOP/s, median of `repeats`) at `n x n x n`."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2]


class PeakMemory:
    """Peak memory while the block runs, above what was in use at its start: device memory on
    CUDA; on CPU, the process's resident memory sampled every 5 ms, from a start where the
    memory malloc kept free (`actors.allocator`) was handed back."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _in_use() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        release_free_memory()
        self._base = self._in_use()
        self._high = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._high = max(self._high, self._in_use())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._high, self._in_use()) - self._base

    @property
    def mib(self) -> float:
        return self.peak_bytes / 2**20


def setup_host(threads: int) -> None:
    """CPU threads, and freed memory kept in the process (`actors.allocator`) from the start, for
    every tool of the run alike (a `Patcher` on a CPU sets it anyway)."""
    torch.set_num_threads(threads)
    kept = keep_freed_memory()
    print(f"host: {threads} torch threads; freed memory kept in the process: {kept}")
