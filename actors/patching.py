"""Batched, exact activation patching (causal tracing) of clean/counterfactual program pairs.

Three steps, each its own module:

1. **Plan** (`actors.plan`): every (site, layer, position[, head]) patch of the programs, which
   need no forward, and the passes that compute the rest. Plain data; `Patcher.plan` returns it
   for reading before anything runs.
2. **Execute** (`actors.engine`, `actors.execute`): the clean and counterfactual runs of the
   programs (one forward per program length and wave), then each pass, with rows of several
   programs in one forward.
3. **Reduce** (`actors.readout`, inside each forward): only each row's logits of the two answer
   tokens (and, for `answer_logprob`, the log-sum-exp) and its top-1 token leave the forward.
   `actors.rows` turns them into rows of `PATCHING_SCHEMA`.

What is asked is `actors.answers`' rule, shared with behaviour: the answer prefix (a string,
or `auto`: from the model's greedy next token, one extra forward per program) and the tokens
both answers share are appended to the prompts, and the first tokens at which the answers
differ are compared. The clean and counterfactual runs also read the family's candidate tokens
there, for `choice_correct`. Under `metric: answer_logprob` a pair's answers become engine
programs of their own (`actors.forcing`), scored by teacher forcing.

The result equals one full forward per patch with plain hooks (tests check it against
`tests/reference.py`, not this code, on every architecture `actors.arch` maps).
"""

import dataclasses
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
import torch

from actors.allocator import keep_freed_memory
from actors.answers import AUTO, choice, resolve_prefixes
from actors.arch import SITES, ArchMap
from actors.budget import (
    STACK_FRACTION,
    BatchSized,
    Footprint,
    auto_budget,
    row_limit,
)
from actors.engine import Engine, Stack
from actors.execute import run_plan
from actors.forcing import Unit, tokens, units
from actors.loading import LoadedModel
from actors.plan import Plan, Reads, build_plan
from actors.readout import VOCAB_CHUNK, Read, Readout
from actors.rows import Wave, append_rows, run_scores
from actors.targets import EncodedPair, Skip, encode_program
from orchestrator.tasks import Program, get_family
from orchestrator.tasks.counterfactuals import KINDS, NONE_BECAUSE, ROOT_VALUE, SAME_ANSWER, variant

logger = logging.getLogger(__name__)

Metric = Literal["first_token", "answer_logprob"]
Cells = Mapping[tuple[str, int, int], Collection[tuple[str, int, int, int | None]]]
"""(task, seq_len, index) of a program -> the (site, layer, pos, head) cells to patch."""
METRICS: tuple[str, ...] = ("first_token", "answer_logprob")

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
        ("answer_prefix", pa.string()),
        ("metric", pa.string()),
        ("top1", pa.string()),
        ("top1_candidate", pa.bool_()),
        ("top1_correct", pa.bool_()),
        ("choice_correct", pa.bool_()),
        ("cf_top1_correct", pa.bool_()),
        ("cf_choice_correct", pa.bool_()),
        ("clean_logit_diff", pa.float32()),
        ("cf_logit_diff", pa.float32()),
        ("patched_logit_diff", pa.float32()),
        ("norm_effect", pa.float32()),
        ("flipped", pa.bool_()),
        ("counterfactual", pa.string()),
        ("contrast_answer", pa.string()),
        ("contrast_logit_diff", pa.float32()),
    ]
)
# No activations kept: the runs that only measure a logit difference.
NO_READS = Reads((), (), (), ())


class Patcher(BatchSized):
    """Patches programs on one loaded model. Plain class: the orchestrator's actor wraps it.

    Args:
        lm: the loaded model.
        batch_size: rows per forward at most, or `auto`: as many as fit the memory budget
            (`actors.budget`), splitting a pass that still runs out of memory.
        budget_bytes: the activation budget of `auto` (default: from the device's free memory).
        vocab_chunk: vocabulary rows per matmul of the readout's top-1 search.
        metric: `first_token` (the logits of the compared tokens) or `answer_logprob` (the
            summed log-probability of each whole answer under teacher forcing).

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
        metric: Metric = "first_token",
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}; use one of {list(METRICS)}")
        self.metric = metric
        self.lm = lm
        if lm.device.type == "cpu":
            keep_freed_memory()
        self.arch: ArchMap = lm.arch
        self.batch_size = batch_size
        # The log-sum-exp over the vocabulary costs 5-12% of the readout; only log-probs need it.
        self.readout = Readout.of(lm.model, vocab_chunk, lse=metric == "answer_logprob")
        self.engine = Engine(lm.model, lm.arch, self.readout)
        dtype = next(lm.model.parameters()).dtype
        self.footprint = Footprint.of(lm.arch, lm.model.config, dtype.itemsize)
        self.budget_bytes = budget_bytes
        self.skipped: list[tuple[Any, str]] = []
        self.last_plan: Plan | None = None
        self._checked = False

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
    def encode(
        self, programs: Sequence[Any], answer_prefix: str, counterfactual: str = ROOT_VALUE
    ) -> list[tuple[dict, EncodedPair]]:
        """Tokenized pairs of the programs that can be patched (the others go to
        `self.skipped`, with the reason), under the answer prefix (`auto`: one greedy forward
        per program), each with its `counterfactual` kind (`orchestrator.tasks.counterfactuals`).

        A program's dict also carries `counterfactual`, `contrast_answer` and, for the kinds
        whose answer is the clean one (`SAME_ANSWER`), `contrast_logit_diff`: the logit
        difference of the root-value counterfactual's run, measured here (one clean and one
        counterfactual forward per program, no activations kept), which scales `norm_effect`.
        """
        if counterfactual not in KINDS:
            raise ValueError(f"counterfactual={counterfactual!r}; use one of {list(KINDS)}")
        progs = self._variants(programs, counterfactual)
        prefixes = [answer_prefix] * len(progs)
        if answer_prefix == AUTO:  # one greedy forward per program, a family at a time
            for task in sorted({p["task"] for p in progs}):
                index = [i for i, p in enumerate(progs) if p["task"] == task]
                found = resolve_prefixes(
                    self.lm.model,
                    self.lm.tokenizer,
                    [progs[i]["text"] for i in index],
                    get_family(task).candidates,
                    AUTO,
                )
                for i, prefix in zip(index, found, strict=True):
                    prefixes[i] = prefix
        pairs, roots = [], []
        for prog, prefix in zip(progs, prefixes, strict=True):
            pair = encode_program(self.lm.tokenizer, prog, prefix, prog["contrast_answer"])
            if isinstance(pair, EncodedPair) and pair.same_answer:
                # The control's scale: its root-value counterfactual, asked the same way.
                root = {**prog, "cf_text": prog["root_cf_text"]}
                root["cf_answer"] = prog["contrast_answer"]
                scale = encode_program(self.lm.tokenizer, root, prefix)
                if isinstance(scale, Skip):
                    pair = Skip(f"its root-value counterfactual, the scale: {scale.reason}")
                else:
                    roots.append(scale)
            if isinstance(pair, Skip):
                self.skipped.append((prog, pair.reason))
            else:
                pairs.append((prog, pair))
        if roots:
            assert len(roots) == len(pairs), "one kind per call: every pair is a control"
            for (prog, _), diff in zip(pairs, self._logit_diffs(roots), strict=True):
                prog["contrast_logit_diff"] = diff
        return pairs

    def _variants(self, programs: Sequence[Any], kind: str) -> list[dict]:
        """The programs as dicts with the counterfactual of `kind` (those without one go to
        `self.skipped`)."""
        out = []
        for p in programs:
            prog = p if isinstance(p, dict) else p.to_dict()
            if kind == ROOT_VALUE:
                out.append({**prog, "counterfactual": kind, "contrast_answer": prog["cf_answer"]})
                continue
            made = variant(p if isinstance(p, Program) else Program.from_dict(p), kind)
            if made is None:
                self.skipped.append((prog, f"no {kind} counterfactual: {NONE_BECAUSE[kind]}"))
                continue
            contrast = prog["cf_answer"] if kind in SAME_ANSWER else made.cf_answer
            out.append(
                {
                    **made.to_dict(),
                    "counterfactual": kind,
                    "contrast_answer": contrast,
                    "root_cf_text": prog["cf_text"],
                }
            )
        return out

    def _logit_diffs(self, pairs: Sequence[EncodedPair]) -> list[float]:
        """Each pair's counterfactual run's logit difference, from the clean and
        counterfactual forwards alone, as many programs at once as a wave keeps."""
        out: list[float] = []
        step = self._stack_wave([({}, pair) for pair in pairs], NO_READS)
        for start in range(0, len(pairs), step):
            part = list(pairs[start : start + step])
            programs = units(part, self.metric)
            stacks, _ = self._stacks(programs, NO_READS, part)
            out += [cf - clean for clean, cf in run_scores(programs, stacks, len(part), "cf")]
        return out

    def _units(self, pairs: list[tuple[dict, EncodedPair]]) -> list[Unit]:
        return units([pair for _, pair in pairs], self.metric)

    def _plan(self, pairs, sites, layers, positions, cells: Cells | None = None) -> Plan:
        programs = self._units(pairs)
        shapes = [u.shape(pairs[u.source][1], positions) for u in programs]
        n = self.arch.n_layers
        layers = list(range(n)) if layers is None else list(layers)
        keep = None
        if cells is not None:
            wanted = [cells.get(program_key(pairs[u.source][0]), ()) for u in programs]
            keep = lambda g, site, layer, pos, head: (site, layer, pos, head) in wanted[g]  # noqa: E731
        try:
            return build_plan(shapes, sites, layers, n, self.arch.n_heads, self._row_limit(), keep)
        except ValueError as err:
            raise ValueError(f"{self.lm.name}: {err}") from None

    def plan(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
        answer_prefix: str = "",
        counterfactual: str = ROOT_VALUE,
    ) -> Plan:
        """The plan `patch` would run for these arguments (nothing runs but, under `auto`, the
        prefix's greedy forward, and for the controls the root counterfactual's runs)."""
        _check_arguments(sites, positions)
        pairs = self.encode(programs, answer_prefix, counterfactual)
        return self._plan(pairs, sites, layers, positions)

    # -- execute ----------------------------------------------------------------------------
    def _stack_wave(self, pairs: list[tuple[dict, EncodedPair]], reads: Reads) -> int:
        """Programs whose clean/counterfactual activations are kept at once."""
        budget = self._budget()
        if budget is None:
            return len(pairs)
        n_tokens = max(len(u.clean_ids) for u in self._units(pairs))
        # A pair is two programs when both of its answers are forced.
        per_program = self.footprint.stack_bytes(reads, n_tokens) * (
            1 if self.metric == "first_token" else 2
        )
        return max(1, int(budget * STACK_FRACTION) // per_program)

    def _stacks(
        self, programs: list[Unit], reads: Reads, pairs: Sequence[EncodedPair]
    ) -> tuple[dict[tuple[int, int], tuple[Stack, dict[int, int]]], list[tuple[bool, bool]]]:
        """The runs of the engine programs of each (length, n_read), and per pair whether the
        clean run's answer and the counterfactual run's own answer beat the family's other
        candidates there."""
        by_key: dict[tuple[int, int], list[int]] = {}
        for i, u in enumerate(programs):
            by_key.setdefault((len(u.clean_ids), u.n_read), []).append(i)
        # The runs read every candidate's token at the compared position; the passes read
        # the two answers' only.
        width = max(len(read) for u in programs for read in u.reads)
        stacks = {}
        choices: dict[int, tuple[bool, bool]] = {}
        device = self.lm.device
        for key, members in by_key.items():
            mine = [programs[i] for i in members]
            clean = torch.tensor([u.clean_ids for u in mine], device=device)
            cf = torch.tensor([u.cf_ids for u in mine], device=device)
            stack = self.engine.runs(clean, cf, tokens(mine, width, device), reads)
            for s, u in enumerate(mine):
                if u.role == "cf":
                    continue
                first = u.reads[0]
                picked = slice(2, len(first))
                at = (s,) if u.role == "pair" else (s, 0)
                own = pairs[u.source].cf_own_id
                choices[u.source] = (
                    choice(stack.clean_logits[at][picked].tolist(), first[2:], first[0]),
                    choice(stack.cf_logits[at][picked].tolist(), first[2:], own),
                )
            stack = dataclasses.replace(
                stack,
                tokens=stack.tokens[..., :2],
                clean_logits=stack.clean_logits[..., :2],
                cf_logits=stack.cf_logits[..., :2],
            )
            stacks[key] = (stack, {i: s for s, i in enumerate(members)})
        return stacks, [choices[g] for g in sorted(choices)]

    def _execute(self, plan: Plan, pairs) -> tuple[list[Unit], Read, dict, list]:
        programs = self._units(pairs)
        stacks, choices = self._stacks(programs, plan.reads, [pair for _, pair in pairs])
        auto = self.batch_size == "auto"
        splits = self.engine.stats.oom_splits
        read = run_plan(self.engine, plan, stacks, split_on_oom=auto)
        if auto and self.engine.stats.oom_splits > splits:
            # The footprint underestimated this device: plan the next waves with less.
            self.budget_bytes = max(1, self.budget_bytes // 2)
            logger.warning(
                "%s: passes ran out of memory and were split; budget now %.0f MiB",
                self.lm.name,
                self.budget_bytes / 2**20,
            )
        return programs, read, stacks, choices

    def run(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
        answer_prefix: str = "",
        cells: Cells | None = None,
        counterfactual: str = ROOT_VALUE,
    ) -> Iterator[Wave]:
        """Patch the programs, a wave of programs at a time (as many as the memory budget keeps
        at once); arguments as for `patch`. Yields each wave's plan and readouts."""
        _check_arguments(sites, positions)
        pairs = self.encode(programs, answer_prefix, counterfactual)
        return self.run_pairs(pairs, sites, layers, positions, cells)

    def run_pairs(
        self,
        pairs: list[tuple[dict, EncodedPair]],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
        cells: Cells | None = None,
    ) -> Iterator[Wave]:
        """`run` on programs already encoded (`encode`)."""
        _check_arguments(sites, positions)
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
            plan = self._plan(part, sites, layers, positions, cells)
            self.last_plan = plan
            yield Wave(plan, part, *self._execute(plan, part))

    def patch(
        self,
        programs: Sequence[Any],
        sites: Sequence[str] = ("resid_pre",),
        layers: Sequence[int] | None = None,
        positions: str = "all",
        answer_prefix: str = "",
        cells: Cells | None = None,
        counterfactual: str = ROOT_VALUE,
    ) -> pa.Table:
        """Patch every program at every (site, layer, position[, head]); one row per patch.

        Args:
            programs: `orchestrator.tasks.Program`s (or dicts with the same keys) that have a
                counterfactual.
            sites: any of `resid_pre`, `attn_head`, `mlp_out`.
            layers: layer indices (default: all).
            positions: `all` token positions, or only the labelled `targets`.
            answer_prefix: the text between prompt and answer (`actors.answers`), or `auto`:
                from the model's greedy next token, per program.
            cells: only these cells: `(task, seq_len, index)` -> a set of (site, layer, pos,
                head) (head None but for `attn_head`); a program not in it gets no row.
            counterfactual: where the patched activations come from
                (`orchestrator.tasks.counterfactuals.KINDS`): the program's own root-value
                counterfactual, or another kind made from it (binding programs). For the
                controls (`distractor`, `reassign`), whose answer is the clean one, the logit
                difference contrasts the clean answer with the root-value counterfactual's
                (`contrast_answer`), and `norm_effect` is scaled by that counterfactual's run
                (`contrast_logit_diff`), so the controls read on root-value's scale; their
                `flipped` is a patched top-1 other than the clean answer.

        Returns:
            A table in `PATCHING_SCHEMA`. Programs that cannot be patched with this tokenizer
            are left out and listed, with the reason, in `self.skipped`.

        Raises:
            ValueError: an unknown site or positions value, or a layer out of range.
            torch.OutOfMemoryError: with `batch_size: auto`, not even one row per forward fits;
                with an integer batch size, the first time a forward does not fit.
        """
        columns: dict[str, list] = {f.name: [] for f in PATCHING_SCHEMA}
        waves = self.run(programs, sites, layers, positions, answer_prefix, cells, counterfactual)
        for wave in waves:
            append_rows(columns, self.lm.name, self.metric, wave, self.lm.tokenizer)
        return pa.table(columns, schema=PATCHING_SCHEMA)


def program_key(program: dict) -> tuple[str, int, int]:
    """(task, seq_len, index): a program's identity in a sweep."""
    return program["task"], program["seq_len"], program["index"]


def _check_arguments(sites: Sequence[str], positions: str) -> None:
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; the sites are {list(SITES)}")
    if positions not in ("all", "targets"):
        raise ValueError(f"positions={positions!r}; use all or targets")
