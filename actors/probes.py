"""Linear probes: what the residual stream entering each layer encodes at the chain's positions
(Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks").

For each (layer, label) a multinomial logistic-regression probe reads the residual stream
entering the layer (patching's `resid_pre` site; layer `n_layers` is the stream leaving the
last layer, before the final norm, where the answer is written) at the label's token, fitted
on a train split
of the programs and scored on the rest. A probe that reads a target well may only have
memorised something the position carries anyway, so each probe has a *control task* of the
same size: the labels are a fixed random function of the variable at the position (the
left-hand side of a `ref_depth_k_rhs` line, the queried variable at `final_colon`) onto as many
classes as the target has. `selectivity = accuracy - control_accuracy` is what the layer
encodes of the target beyond what identifying the position's variable gives. (Hewitt & Liang
draw a control label from the targets' empirical distribution; here it is uniform over the
target's classes.)

* Labels: every `ref_depth_<k>_rhs` some program has, and `final_colon`; a label covering
  several tokens is read at its last. A program without a label (depth varies) gives it no
  example.
* Targets (`TARGETS`): at `ref_depth_k_rhs` the chain's root value, at `final_colon` the
  answer; in a binding chain both are `program.answer`. Classes are the distinct answers of
  the label's examples.
* Split (`split`): programs ranked by a SHA-256 of (seed, task, seq_len, index), the first
  `round(train_fraction * n)` the train split: the same in any order of the programs, and one
  split for every (layer, label), so a program is on one side for all of them.
* Fit (`fit_probe`): features standardised with the train split's mean and std, softmax
  regression with an L2 penalty on the weights, full-batch L-BFGS in float64 from zeros:
  deterministic, no learning rate or epochs to tune.

Activations come from one forward per batch of programs of one token length (no padding), a
pre-hook on each probed layer keeping only the labelled positions' vectors (float32, on the
CPU): `n_programs x n_layers x n_labels x d_model` floats per shard, 1.3 GB for 500 programs
of a 32-layer, 4096-wide model.
"""

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import torch
from jaxtyping import Float
from torch import Tensor

from actors.budget import BatchSized, Footprint, auto_budget
from actors.engine import hidden_of, installed, output_of
from actors.execute import in_parts
from actors.loading import LoadedModel
from actors.probe_fit import as_program, control_labels, fit_probe, majority, seed_hash, split
from actors.targets import label_positions
from orchestrator.tasks.base import Program
from orchestrator.tasks.binding import MAX_DEPTH

__all__ = [
    "LABELS",
    "PROBES_SCHEMA",
    "TARGETS",
    "Examples",
    "Prober",
    "control_labels",
    "fit_probe",
    "split",
    "target_of",
]

logger = logging.getLogger(__name__)

TASK = "binding"
FINAL = "final_colon"
REF_DEPTH = re.compile(r"ref_depth_(\d+)_rhs")
# Every label a probe reads; by default those the programs have.
LABELS: tuple[str, ...] = (*(f"ref_depth_{k}_rhs" for k in range(1, MAX_DEPTH + 1)), FINAL)
TARGETS: dict[str, str] = {"ref_depth": "root_value", "final_colon": "answer"}

PROBES_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("task", pa.string()),
        ("seq_len", pa.int32()),
        ("layer", pa.int32()),
        ("label", pa.string()),
        ("target", pa.string()),
        ("accuracy", pa.float32()),
        ("control_accuracy", pa.float32()),
        ("chance", pa.float32()),  # majority-class rate of the test split's targets
        ("control_chance", pa.float32()),  # the same for the control labels
        ("n_train", pa.int32()),
        ("n_test", pa.int32()),
        ("n_classes", pa.int32()),
    ]
)


def target_of(label: str) -> str:
    """The target probed at `label`: `root_value` at `ref_depth_k_rhs`, `answer` at
    `final_colon`.

    Raises:
        ValueError: a label with no target.
    """
    if REF_DEPTH.fullmatch(label):
        return TARGETS["ref_depth"]
    if label == FINAL:
        return TARGETS[FINAL]
    raise ValueError(
        f"label {label!r} has no probe target; probe labels are ref_depth_<k>_rhs (target "
        "root_value) and final_colon (target answer): list only those, or leave labels unset"
    )


def _label_order(label: str) -> tuple[int, int]:
    """ref_depth_1_rhs, ref_depth_2_rhs, ..., then final_colon."""
    match = REF_DEPTH.fullmatch(label)
    return (0, int(match.group(1))) if match else (1, 0)


@dataclasses.dataclass(frozen=True)
class Examples:
    """One (layer, label)'s examples: the residual stream entering the layer at the label's
    token, one row per program that has the label, and which programs (indices into the
    programs given), ascending."""

    x: Float[Tensor, "example d_model"]
    programs: list[int]


def _check_binding(programs: Sequence[Program]) -> None:
    for p in programs:
        if p.task != TASK:
            raise ValueError(
                f"program {p.task}/{p.seq_len}/{p.index}: probes read binding programs' "
                f"chains, not {p.task!r}; fix: list only binding under experiments.probes.tasks"
            )


def variable_at(program: Program, label: str) -> str:
    """The variable the control task reads at `label`: the left-hand side of the line holding
    a `ref_depth_k_rhs` span, the queried variable at `final_colon`."""
    if label == FINAL:
        return program.query
    start = program.spans[label][0]
    line = program.text[program.text.rfind("\n", 0, start) + 1 : start]
    return line.split("=")[0].strip()


class Prober(BatchSized):
    """Linear probes of the residual stream on one loaded model. Plain class, like `Knocker`.

    Args:
        lm: the loaded model.
        batch_size: programs per forward, or `auto`: as many as fit the memory budget
            (`actors.budget`), halved on out-of-memory.
        l2: the probes' L2 penalty (`fit_probe`).
        train_fraction: the share of programs in the train split (`split`).

    Example:
        >>> table = Prober(lm).probe(programs)  # PROBES_SCHEMA, one row per (layer, label)
    """

    def __init__(
        self,
        lm: LoadedModel,
        batch_size: int | Literal["auto"] = 64,
        l2: float = 1e-3,
        train_fraction: float = 0.5,
    ) -> None:
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction={train_fraction} must be strictly between 0 and 1")
        if l2 < 0:
            raise ValueError(f"l2={l2} must be >= 0")
        self.lm = lm
        self.arch = lm.arch
        self.batch_size = batch_size
        self.l2 = l2
        self.train_fraction = train_fraction
        self.budget_bytes: int | None = None
        dtype = next(lm.model.parameters()).dtype
        self.footprint = Footprint.of(lm.arch, lm.model.config, dtype.itemsize)
        self.skipped: list[tuple[dict, str]] = []

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        n = self.arch.n_layers
        chosen = list(range(n + 1)) if layers is None else sorted(set(layers))
        bad = [x for x in chosen if not 0 <= x <= n]
        if bad:
            raise ValueError(
                f"{self.lm.name}: layers {bad} out of range 0..{n} ({n}: the residual stream "
                "leaving the last layer)"
            )
        return chosen

    def _rows_per_forward(self, n_tokens: int) -> int:
        if self.batch_size != "auto":
            return self.batch_size
        if self.budget_bytes is None:
            self.budget_bytes = auto_budget(self.lm.device)
        return max(1, self.budget_bytes // self.footprint.row_bytes(n_tokens, n_tokens))

    def _encode(
        self, program: Program, labels: Sequence[str]
    ) -> tuple[list[int], dict[str, int]] | str:
        """The program's token ids and each of `labels` it has at its last token, or the reason
        it gives nothing (it has some of the labels, but none gets a token)."""
        enc = self.lm.tokenizer(program.text, return_offsets_mapping=True)
        names = label_positions(enc["offset_mapping"], program.spans)
        last = {name: pos for pos, name in enumerate(names)}
        found = {label: last[label] for label in labels if label in last}
        has = [label for label in labels if label in program.spans]
        if has and not found:
            return f"its text tokenizes with no token in the spans of {has}"
        return enc["input_ids"], found

    @torch.no_grad()
    def _forward(
        self, ids: list[list[int]], rows: list[int], pos: list[int], layers: list[int]
    ) -> dict[int, Float[Tensor, "example d_model"]]:
        """Per layer, the residual stream entering it at (batch row `rows[i]`, `pos[i]`); at
        layer `n_layers`, the stream leaving the last layer (before the final norm)."""
        kept: dict[int, Tensor] = {}
        index = torch.tensor(rows), torch.tensor(pos)

        def store(layer: int, hidden: Tensor) -> None:
            r, p = (t.to(hidden.device) for t in index)
            kept[layer] = hidden[r, p].float().cpu()

        def keep(layer: int):
            def fn(module, args, kwargs):
                store(layer, hidden_of(args, kwargs))

            return fn

        def keep_last(module, args, out):
            store(self.arch.n_layers, output_of(out))

        n = self.arch.n_layers
        hooks = [(self.arch.layers[x], "pre", keep(x)) for x in layers if x < n]
        hooks += [(self.arch.layers[n - 1], "post", keep_last)] if n in layers else []
        with installed(hooks):
            self.lm.model.base_model(
                input_ids=torch.tensor(ids, device=self.lm.device), use_cache=False
            )
        assert sorted(kept) == layers, f"layers {sorted(set(layers) - set(kept))} never ran"
        return kept

    def _gather(
        self, programs: list[Program], layers: list[int], labels: list[str]
    ) -> tuple[dict[tuple[int, str], Examples], list[tuple[dict, str]]]:
        """`activations`, and the programs skipped with the reason."""
        encoded = [self._encode(p, labels) for p in programs]
        skipped = [
            (p.to_dict(), e) for p, e in zip(programs, encoded, strict=True) if type(e) is str
        ]
        by_length: dict[int, list[int]] = {}
        for g, enc in enumerate(encoded):
            if not isinstance(enc, str) and enc[1]:
                by_length.setdefault(len(enc[0]), []).append(g)
        vectors: dict[tuple[int, str], dict[int, Tensor]] = {}

        def forward(part: list[int]) -> tuple[list[tuple[int, str]], dict[int, Tensor]]:
            which, rows, pos = [], [], []
            for row, g in enumerate(part):
                for label, p in encoded[g][1].items():
                    which.append((g, label))
                    rows.append(row)
                    pos.append(p)
            return which, self._forward([encoded[g][0] for g in part], rows, pos, layers)

        def halve_budget() -> None:  # for the lengths that follow
            self.budget_bytes = max(1, self.budget_bytes // 2)

        auto = self.batch_size == "auto"
        for n_tokens, members in sorted(by_length.items()):
            size = self._rows_per_forward(n_tokens)
            for _, (which, kept) in in_parts(members, size, forward, auto, halve_budget):
                for layer, x in kept.items():
                    for (g, label), v in zip(which, x, strict=True):
                        vectors.setdefault((layer, label), {})[g] = v
        examples = {}
        for key, by_program in vectors.items():
            order = sorted(by_program)
            examples[key] = Examples(torch.stack([by_program[g] for g in order]), order)
        return examples, skipped

    def activations(
        self,
        programs: Sequence[Program],
        layers: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
    ) -> dict[tuple[int, str], Examples]:
        """The residual stream entering each layer at each label's last token.

        Args:
            programs: binding `Program`s (or their `to_dict()`).
            layers: layer indices 0..n_layers, n_layers the stream leaving the last layer
                (default: all of them).
            labels: the labels to read (default: `LABELS` as the programs have them).

        Returns:
            Per (layer, label) that some program has, its `Examples` (indices into
            `programs`). Programs that give no example are in `self.skipped` with the reason.

        Raises:
            ValueError: a program of another family, a label with no target, a layer out of
                range.
        """
        progs = [as_program(p) for p in programs]
        _check_binding(progs)
        names = self._labels(progs, labels)
        examples, self.skipped = self._gather(progs, self._layers(layers), names)
        return examples

    @staticmethod
    def _labels(programs: Sequence[Program], labels: Sequence[str] | None) -> list[str]:
        if labels is None:
            labels = {x for p in programs for x in p.spans if REF_DEPTH.fullmatch(x)} | {FINAL}
        for label in labels:
            target_of(label)
        return sorted(set(labels), key=_label_order)

    def probe(
        self,
        programs: Sequence[Program],
        layers: Sequence[int] | None = None,
        labels: Sequence[str] | None = None,
        seed: int = 0,
    ) -> pa.Table:
        """Probe every (layer, label) of the programs, with its control task.

        Args:
            programs: binding `Program`s (or their `to_dict()`); programs of several
                (task, seq_len) are probed a group at a time.
            layers: layer indices 0..n_layers, n_layers the stream leaving the last layer
                (default: all of them).
            labels: the labels to probe (default: every `ref_depth_<k>_rhs` the group's
                programs have, and `final_colon`).
            seed: seeds the split and, with the label (`SHA-256(seed, label)`), the control
                task's function from variable to class.

        Returns:
            A table in `PROBES_SCHEMA`: per (task, seq_len) group (ascending), one row per
            layer and label (layer, then label in chain order, `final_colon` last) with at
            least 2 train and 1 test example. Programs that give no example are in
            `self.skipped` with the reason.

        Raises:
            ValueError: a program of another family, a label with no target, a layer out of
                range.
            torch.OutOfMemoryError: with an integer batch size, a forward that does not fit;
                with `auto`, not even one program per forward.
        """
        progs = [as_program(p) for p in programs]
        _check_binding(progs)
        layers = self._layers(layers)
        self._labels(progs, labels)  # fails on a bad label before any forward
        self.skipped = []
        groups: dict[tuple[str, int], list[Program]] = {}
        for p in progs:
            groups.setdefault((p.task, p.seq_len), []).append(p)
        columns: dict[str, list] = {f.name: [] for f in PROBES_SCHEMA}
        for (task, seq_len), members in sorted(groups.items()):
            group = sorted(members, key=lambda p: p.index)  # the same fit in any order
            names = self._labels(group, labels)
            logger.debug("%s: %d programs of %s/%d", self.lm.name, len(group), task, seq_len)
            examples, skipped = self._gather(group, layers, names)
            self.skipped += skipped
            train = set(split(group, self.train_fraction, seed)[0])
            for layer in layers:
                for label in names:
                    if (layer, label) not in examples:
                        continue
                    row = self._row(group, examples[(layer, label)], train, label, seed)
                    if row is None:
                        continue
                    row.update(model=self.lm.name, task=task, seq_len=seq_len, layer=layer)
                    for key, value in row.items():
                        columns[key].append(value)
        return pa.table(columns, schema=PROBES_SCHEMA)

    def _row(
        self, group: list[Program], ex: Examples, train: set[int], label: str, seed: int
    ) -> dict[str, Any] | None:
        """The probe and control columns of one (layer, label), or None with fewer than 2
        train or 1 test example."""
        tr = [i for i, g in enumerate(ex.programs) if g in train]
        te = [i for i, g in enumerate(ex.programs) if g not in train]
        if len(tr) < 2 or len(te) < 1:
            return None
        answers = [group[g].answer for g in ex.programs]
        classes = sorted(set(answers))
        y = torch.tensor([classes.index(a) for a in answers])
        variables = [variable_at(group[g], label) for g in ex.programs]
        control = torch.tensor(control_labels(variables, len(classes), seed_hash(seed, label)))
        tr_i, te_i = torch.tensor(tr), torch.tensor(te)
        x_tr, x_te = ex.x[tr_i], ex.x[te_i]
        n = len(classes)
        return {
            "label": label,
            "target": target_of(label),
            "accuracy": fit_probe(x_tr, y[tr_i], x_te, y[te_i], n, self.l2),
            "control_accuracy": fit_probe(x_tr, control[tr_i], x_te, control[te_i], n, self.l2),
            "chance": majority(y[te_i]),
            "control_chance": majority(control[te_i]),
            "n_train": len(tr),
            "n_test": len(te),
            "n_classes": n,
        }
