"""Batched, exact activation patching (causal tracing) of clean/counterfactual program pairs.

Three steps, each its own module:

1. **Plan** (`actors.plan`): every (site, layer, position[, head]) patch of the programs, which
   need no forward, and the passes that compute the rest. Plain data; `Patcher.plan` returns it
   for reading before anything runs.
2. **Execute** (`actors.engine`): the clean and counterfactual runs of the programs (one forward
   per program length and wave), then each pass, with rows of several programs in one forward.
3. **Reduce** (`actors.readout`, inside each forward): only each row's logits of the two answer
   tokens and its top-1 token leave the forward. This module turns them into rows of
   `PATCHING_SCHEMA`.

The result equals one full forward per patch with plain hooks (tests check it against
`tests/reference.py`, not this code, on every architecture `actors.arch` maps).
"""

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import pyarrow as pa
import torch
from jaxtyping import Float, Int
from torch import Tensor

from actors.allocator import keep_freed_memory
from actors.arch import SITES, ArchMap
from actors.budget import STACK_FRACTION, Footprint, auto_budget, row_limit
from actors.engine import Engine, Stack, run_plan
from actors.loading import LoadedModel
from actors.plan import Plan, ProgramShape, Reads, build_plan
from actors.readout import VOCAB_CHUNK, Readout
from actors.targets import EncodedPair, Skip, encode_program

logger = logging.getLogger(__name__)

MIN_DENOMINATOR = 1e-3  # |cf - clean| logit-diff gap below which norm_effect is null

PATCHING_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("program", pa.int64()),
        ("site", pa.string()),
        ("layer", pa.int32()),
        ("head", pa.int32()),
        ("pos", pa.int32()),
        ("token", pa.string()),
        ("label", pa.string()),
        ("clean_answer", pa.string()),
        ("cf_answer", pa.string()),
        ("clean_correct", pa.bool_()),
        ("cf_correct", pa.bool_()),
        ("clean_logit_diff", pa.float32()),
        ("cf_logit_diff", pa.float32()),
        ("patched_logit_diff", pa.float32()),
        ("norm_effect", pa.float32()),
        ("flipped", pa.bool_()),
    ]
)


@dataclasses.dataclass(frozen=True)
class Wave:
    """Programs patched together: their plan, and per patch (in plan order) the logits of
    (clean answer, counterfactual answer) and the top-1 token."""

    plan: Plan
    pairs: list[tuple[dict, EncodedPair]]
    logits: Float[Tensor, "patch 2"]
    top: Int[Tensor, " patch"]
    stacks: dict[int, tuple[Stack, dict[int, int]]]


class Patcher:
    """Patches programs on one loaded model. Plain class: the orchestrator's actor wraps it.

    Args:
        lm: the loaded model.
        batch_size: rows per forward at most, or `auto`: as many as fit the memory budget
            (`actors.budget`), splitting a pass that still runs out of memory.
        budget_bytes: the activation budget of `auto` (default: from the device's free memory).
        vocab_chunk: vocabulary rows per matmul of the readout's top-1 search.

    On a CPU it keeps freed memory in the process (`actors.allocator`): the passes run about
    1.5x faster, and the process's resident memory stays near its peak.

    Example:
        >>> lm = load_model("models/binding-tiny")
        >>> patcher = Patcher(lm)
        >>> print(patcher.plan(programs, sites=["resid_pre"]).describe())
        >>> table = patcher.patch(programs, sites=["resid_pre"], positions="targets")
    """

    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int | Literal["auto"] = "auto",
        budget_bytes: int | None = None,
        vocab_chunk: int = VOCAB_CHUNK,
    ) -> None:
        self.lm = lm
        if lm.device.type == "cpu":
            keep_freed_memory()
        self.arch: ArchMap = lm.arch
        self.batch_size = batch_size
        self.readout = Readout.of(lm.model, vocab_chunk)
        self.engine = Engine(lm.model, lm.arch, self.readout)
        dtype = next(lm.model.parameters()).dtype
        self.footprint = Footprint.of(lm.arch, lm.model.config, dtype.itemsize)
        self.budget_bytes = budget_bytes
        self.skipped: list[tuple[Any, str]] = []
        self.last_plan: Plan | None = None
        self._checked = False

    @property
    def batch_size(self) -> int | Literal["auto"]:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | Literal["auto"]) -> None:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError(f"batch_size={value!r} must be an integer >= 1 or 'auto'")
        self._batch_size = value

    def _budget(self) -> int | None:
        if self.batch_size != "auto":
            return None
        if self.budget_bytes is None:
            self.budget_bytes = auto_budget(self.lm.device)
        return self.budget_bytes

    def _row_limit(self):
        max_rows = None if self.batch_size == "auto" else self.batch_size
        return row_limit(self.footprint, self._budget(), max_rows)

    # -- plan -------------------------------------------------------------------------------
    def _encode(self, programs: Sequence[Any]) -> list[tuple[dict, EncodedPair]]:
        pairs = []
        for program in programs:
            prog = program if isinstance(program, dict) else program.to_dict()
            pair = encode_program(self.lm.tokenizer, prog)
            if isinstance(pair, Skip):
                self.skipped.append((prog, pair.reason))
            else:
                pairs.append((prog, pair))
        return pairs

    def _plan(self, pairs, sites, layers, positions) -> Plan:
        shapes = [
            ProgramShape(len(pair.clean_ids), tuple(pair.diff), tuple(pair.positions(positions)))
            for _, pair in pairs
        ]
        n = self.arch.n_layers
        layers = list(range(n)) if layers is None else list(layers)
        try:
            return build_plan(shapes, sites, layers, n, self.arch.n_heads, self._row_limit())
        except ValueError as err:
            raise ValueError(f"{self.lm.name}: {err}") from None

    def plan(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
    ) -> Plan:
        """The plan `patch` would run for these arguments (nothing runs)."""
        _check_arguments(sites, positions)
        return self._plan(self._encode(programs), sites, layers, positions)

    # -- execute ----------------------------------------------------------------------------
    def _stack_wave(self, pairs: list[tuple[dict, EncodedPair]], reads: Reads) -> int:
        """Programs whose clean/counterfactual activations are kept at once."""
        budget = self._budget()
        if budget is None:
            return len(pairs)
        n_tokens = max(len(p.clean_ids) for _, p in pairs)
        per_program = self.footprint.stack_bytes(reads, n_tokens)
        return max(1, int(budget * STACK_FRACTION) // per_program)

    def _stacks(
        self, pairs: list[tuple[dict, EncodedPair]], reads: Reads
    ) -> dict[int, tuple[Stack, dict[int, int]]]:
        by_length: dict[int, list[int]] = {}
        for g, (_, pair) in enumerate(pairs):
            by_length.setdefault(len(pair.clean_ids), []).append(g)
        stacks = {}
        device = self.lm.device
        for n_tokens, members in by_length.items():
            clean = torch.tensor([pairs[g][1].clean_ids for g in members], device=device)
            cf = torch.tensor([pairs[g][1].cf_ids for g in members], device=device)
            tokens = torch.tensor(
                [[pairs[g][1].clean_answer_id, pairs[g][1].cf_answer_id] for g in members],
                device=device,
            )
            stack = self.engine.runs(clean, cf, tokens, reads)
            stacks[n_tokens] = (stack, {g: s for s, g in enumerate(members)})
        return stacks

    def _execute(self, plan: Plan, pairs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        stacks = self._stacks(pairs, plan.reads)
        auto = self.batch_size == "auto"
        splits = self.engine.stats.oom_splits
        logits, top = run_plan(self.engine, plan, stacks, split_on_oom=auto)
        if auto and self.engine.stats.oom_splits > splits:
            # The footprint underestimated this device: plan the next waves with less.
            self.budget_bytes = max(1, self.budget_bytes // 2)
            logger.warning(
                "%s: passes ran out of memory and were split; budget now %.0f MiB",
                self.lm.name,
                self.budget_bytes / 2**20,
            )
        return logits, top, stacks

    def run(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
    ) -> Iterator[Wave]:
        """Patch the programs, a wave of programs at a time (as many as the memory budget keeps
        at once); arguments as for `patch`. Yields each wave's plan and readouts."""
        _check_arguments(sites, positions)
        pairs = self._encode(programs)
        if not pairs:
            self._plan(pairs, sites, layers, positions)  # the arguments' checks
            return
        if not self._checked:
            ids = torch.tensor([pairs[0][1].clean_ids], device=self.lm.device)
            self.readout.check(self.lm.model, ids)
            self._checked = True
        wave = self._stack_wave(pairs, self._plan(pairs[:1], sites, layers, positions).reads)
        for start in range(0, len(pairs), wave):
            part = pairs[start : start + wave]
            plan = self._plan(part, sites, layers, positions)
            self.last_plan = plan
            logits, top, stacks = self._execute(plan, part)
            yield Wave(plan, part, logits, top, stacks)

    def patch(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
    ) -> pa.Table:
        """Patch every program at every (site, layer, position[, head]); one row per patch.

        Args:
            programs: `orchestrator.tasks.Program`s (or dicts with the same keys) that have a
                counterfactual.
            sites: any of `resid_pre`, `attn_head`, `mlp_out`.
            layers: layer indices (default: all).
            positions: `all` token positions, or only the labelled `targets`.

        Returns:
            A table in `PATCHING_SCHEMA`. Programs that cannot be patched with this tokenizer
            are left out and listed, with the reason, in `self.skipped`.

        Raises:
            ValueError: an unknown site or positions value, or a layer out of range.
            torch.OutOfMemoryError: with `batch_size: auto`, not even one row per forward fits;
                with an integer batch size, the first time a forward does not fit.
        """
        columns: dict[str, list] = {f.name: [] for f in PATCHING_SCHEMA}
        for wave in self.run(programs, sites, layers, positions):
            _append(columns, self.lm.name, wave)
        return pa.table(columns, schema=PATCHING_SCHEMA)


def _check_arguments(sites: Sequence[str], positions: str) -> None:
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; the sites are {list(SITES)}")
    if positions not in ("all", "targets"):
        raise ValueError(f"positions={positions!r}; use all or targets")


def _append(columns: dict[str, list], model: str, wave: Wave) -> None:
    """Rows of one wave, in its plan's patch order."""
    plan, pairs, stacks = wave.plan, wave.pairs, wave.stacks
    patched = (wave.logits[:, 1] - wave.logits[:, 0]).tolist()
    flipped = wave.top.tolist()
    per_program = []
    for g, (prog, pair) in enumerate(pairs):
        stack, slot_of = stacks[len(pair.clean_ids)]
        s = slot_of[g]
        clean_ld = (stack.clean_logits[s, 1] - stack.clean_logits[s, 0]).item()
        cf_ld = (stack.cf_logits[s, 1] - stack.cf_logits[s, 0]).item()
        per_program.append(
            {
                "model": model,
                "task": prog["task"],
                "seq_len": prog["seq_len"],
                "program": prog["index"],
                "clean_answer": prog["answer"],
                "cf_answer": prog["cf_answer"],
                "clean_correct": int(stack.clean_top[s]) == pair.clean_answer_id,
                "cf_correct": int(stack.cf_top[s]) == pair.cf_answer_id,
                "clean_logit_diff": clean_ld,
                "cf_logit_diff": cf_ld,
            }
        )
    for i, patch in enumerate(plan.patches):
        fixed = per_program[patch.program]
        pair = pairs[patch.program][1]
        for key, value in fixed.items():
            columns[key].append(value)
        columns["site"].append(patch.site)
        columns["layer"].append(patch.layer)
        columns["head"].append(patch.head)
        columns["pos"].append(patch.pos)
        columns["token"].append(pair.tokens[patch.pos])
        columns["label"].append(pair.labels[patch.pos])
        columns["patched_logit_diff"].append(patched[i])
        denom = fixed["cf_logit_diff"] - fixed["clean_logit_diff"]
        columns["norm_effect"].append(
            (patched[i] - fixed["clean_logit_diff"]) / denom
            if abs(denom) >= MIN_DENOMINATOR
            else None
        )
        columns["flipped"].append(flipped[i] == pair.cf_answer_id)
