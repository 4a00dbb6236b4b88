"""Runs a plan (`actors.plan`) on the engine (`actors.engine`): the free patches from their
programs' clean runs, then every pass in order, each pass's readout put in its patches' rows;
a pass that runs out of memory can be split in two and both halves run."""

import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from actors.engine import Engine, Stack
from actors.plan import Plan, StackKey
from actors.readout import Read


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error of torch (CUDA) or of the CPU allocator."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate" in text)
    )


T = TypeVar("T")
R = TypeVar("R")


def in_parts(
    items: Sequence[T],
    size: int,
    run: Callable[[list[T]], R],
    shrink: bool,
    on_oom: Callable[[], None] = lambda: None,
) -> Iterator[tuple[list[T], R]]:
    """`(part, run(part))` over consecutive parts of at most `size` items. Where `shrink`, a
    part that runs out of memory is retried at half the size (down to one item, which
    re-raises), and the parts after it keep the smaller size; `on_oom` runs at each halving.
    (Halving the part that ran, not `size`: a budget's size can be far above the items left.)"""
    start = 0
    while start < len(items):
        part = list(items[start : start + size])
        try:
            out = run(part)
        except Exception as err:
            if not (shrink and size > 1 and is_oom(err)):
                raise
            size = max(1, len(part) // 2)  # of what ran: `size` may exceed the items left
            on_oom()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        yield part, out
        start += len(part)


def run_plan(
    engine: Engine,
    plan: Plan,
    stacks: Mapping[StackKey | int, tuple[Stack, dict[int, int]]],
    split_on_oom: bool = False,
) -> Read:
    """Every patch's readout of its program's tokens: logits, top-1 token and log-sum-exp.

    Args:
        engine: the engine.
        plan: the plan.
        stacks: per `ProgramShape.stack_key` (n_tokens, n_read) of the plan's programs, (its
            stack, program index -> slot). A plain length `n` stands for `(n, 1)`.
        split_on_oom: a pass that runs out of memory is split in two and both halves run
            (down to one row, which re-raises); otherwise the error propagates.

    Returns:
        Per patch, in `plan.patches` order: logits `[patch, k]`, top-1 and log-sum-exp
        `[patch]` where every stack's tokens are 2-D; else `[patch, r, k]` and `[patch, r]`,
        r the largest n_read, where `[:, j]` is the program's j-th readout position
        (`n_tokens - n_read + j`), NaN (top: -1) past its n_read. Free patches get their
        program's clean readout.

    Raises:
        ValueError: `stacks` lacks the key of one of the plan's programs.
    """
    by_key = {(key, 1) if isinstance(key, int) else key: v for key, v in stacks.items()}
    missing = sorted({s.stack_key for s in plan.programs} - set(by_key))
    if missing:
        raise ValueError(
            f"no stack for (n_tokens, n_read) {missing} (stacks: {sorted(by_key)}); run "
            "`Engine.runs` for each `ProgramShape.stack_key` of the plan's programs"
        )
    assert all(st.n_read == key[1] for key, (st, _) in by_key.items()), "stack n_read != key"
    ks = {st.tokens.shape[-1] for st, _ in by_key.values()}
    assert len(ks) == 1, f"stacks read different numbers of tokens: {ks}"
    per_position = any(st.tokens.dim() == 3 for st, _ in by_key.values())
    n = max(key[1] for key in by_key) if per_position else None
    out = Read.empty(len(plan.patches), n, ks.pop(), engine.device)
    for key, (stack, slot_of) in by_key.items():
        free = [
            (i, slot_of[p.program])
            for i, p in enumerate(plan.patches)
            if p.free is not None and plan.programs[p.program].stack_key == key
        ]
        if free:
            index, slots = zip(*free, strict=True)
            at = torch.tensor(slots, device=engine.device)
            clean = Read(stack.clean_logits[at], stack.clean_top[at], stack.clean_lse[at])
            out.put(list(index), clean)
    carried: dict[int, Tensor] = {}
    todo = collections.deque(plan.passes)
    while todo:
        ps = todo.popleft()
        stack, slot_of = by_key[ps.stack_key]
        try:
            result = engine.run_pass(ps, plan, stack, slot_of, carried)
        except Exception as err:
            if not (split_on_oom and is_oom(err) and len(ps.entries) > 1):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            engine.stats.oom_splits += 1
            todo.extendleft(reversed(ps.split()))
            continue
        if result is not None:
            out.put([e.patch for e in ps.entries], result)
            for e in ps.entries:
                carried.pop(e.patch, None)
    assert not carried, f"{len(carried)} pre-pass outputs never used"
    return out
