"""How many rows one forward may hold (`batch_size: auto`), from the model's shapes and a memory
budget.

A pass of `rows` rows fed `width` positions that attend to `context` positions (its prefix plus
itself) holds, at its peak:

* per row and fed position, the activations alive inside one layer: the residual stream, its
  normed copy, queries, the heads' outputs, the MLP's gate, up and activated projections, and the
  hidden states kept to join later layers (`Footprint.per_token`);
* per row and attended position, the keys and values of every layer: the clean prefix copied into
  the cache and the cache's concatenation with the fed positions (`per_context`);
* per row, fed and attended position, one attention score per head (`per_score`; SDPA's math
  kernel, on CPU, materializes them).

`auto` takes `AUTO_FRACTION` of the device's free memory once the model is loaded (CUDA:
`torch.cuda.mem_get_info`; CPU: available RAM, capped at `CPU_BUDGET`: past a few hundred MB a
CPU forward runs no faster and only evicts caches). A pass that still runs out of memory is
split in two and retried, down to one row, and the budget is halved for the passes that follow
(`actors.patching`).
"""

import dataclasses
import os
from typing import Any, Literal

import torch

from actors.arch import ArchMap
from actors.plan import Reads, RowLimit

AUTO_FRACTION = 0.5
CPU_BUDGET = 1 << 30
STACK_FRACTION = 0.25  # of the budget, for the clean/counterfactual activations kept per wave


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes a pass holds, per row (see the module docstring)."""

    per_token: int
    per_context: int
    per_score: int
    dtype_bytes: int
    d_model: int
    attn_width: int

    @classmethod
    def of(cls, arch: ArchMap, config: Any, dtype_bytes: int) -> "Footprint":
        cfg = config.get_text_config()
        d, width = arch.d_model, arch.n_heads * arch.d_head
        d_ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
        kv_heads = getattr(cfg, "num_key_value_heads", None) or arch.n_heads
        per_token = dtype_bytes * (4 * d + 2 * width + 3 * d_ff)
        per_context = dtype_bytes * arch.n_layers * 2 * 2 * kv_heads * arch.d_head
        return cls(per_token, per_context, 4 * arch.n_heads, dtype_bytes, d, width)

    def row_bytes(self, width: int, context: int) -> int:
        """Peak bytes of one row fed `width` positions attending to `context`."""
        return (
            width * self.per_token + context * self.per_context + width * context * self.per_score
        )

    def backward_bytes(self, n_layers: int, n_tokens: int) -> int:
        """Peak bytes of one program's forward and backward with its graph kept (attribution,
        `actors.attribution`): every layer's activations and attention scores are saved for
        the backward, and each takes a gradient of its size."""
        return 2 * n_layers * (n_tokens * self.per_token + n_tokens**2 * self.per_score)

    def stack_bytes(self, reads: Reads, n_tokens: int) -> int:
        """Bytes kept per program by the clean and counterfactual runs (`engine.Stack`), plus
        the two rows of their forward."""
        d, w = self.d_model, self.attn_width
        kept = d * (len(reads.clean_resid) + len(reads.cf_resid) + len(reads.cf_mlp))
        kept += w * len(reads.cf_z)
        cache = self.per_context // 2  # the clean keys and values, without the cat's copy
        per_token = self.dtype_bytes * kept + cache
        return n_tokens * per_token + 2 * self.row_bytes(n_tokens, n_tokens)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_budget(device: torch.device) -> int:
    """The activation budget of `batch_size: auto` on `device`."""
    budget = int(free_memory(device) * AUTO_FRACTION)
    return budget if device.type == "cuda" else min(budget, CPU_BUDGET)


def check_batch_size(value: object) -> None:
    """A batch size is a whole number >= 1 or `auto`.

    Raises:
        ValueError: anything else, naming it.
    """
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"batch_size={value!r} must be an integer >= 1 or 'auto'")


class BatchSized:
    """A `batch_size` attribute checked on every assignment (`check_batch_size`); a subclass
    that hands it on to a tool of its own overrides `_batch_size_set`."""

    _batch_size: int | Literal["auto"]

    @property
    def batch_size(self) -> int | Literal["auto"]:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | Literal["auto"]) -> None:
        check_batch_size(value)
        self._batch_size = value
        self._batch_size_set(value)

    def _batch_size_set(self, value: int | Literal["auto"]) -> None:
        """Called after each assignment (default: nothing)."""


def row_limit(footprint: Footprint, budget_bytes: int | None, max_rows: int | None) -> RowLimit:
    """Rows per pass: what fits `budget_bytes` (None: no memory limit), at most `max_rows`."""

    def limit(width: int, context: int) -> int:
        rows = max_rows or 1 << 62
        if budget_bytes is not None:
            rows = min(rows, budget_bytes // footprint.row_bytes(width, context))
        return max(1, rows)

    return limit
