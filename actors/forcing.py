"""A pair's answers as engine programs, and each run's score of an answer from its readout.

`metric: first_token` asks one engine program per pair: its inputs end where the two answers
first differ, and one readout position reads both answers' tokens there; the score is a logit.

`metric: answer_logprob` scores each whole answer by its summed log-probability under teacher
forcing. The engine reads the last r positions of a program (`ProgramShape.n_read`), so an
answer of r tokens is the pair's inputs followed by its first r - 1 tokens (the same in the
clean and the counterfactual input, so nothing the patch touches changes), and its score is
the sum over the r positions of `logit(token) - logsumexp(logits)`:

* the `clean` program carries the clean answer's tokens, and reads at its first position the
  counterfactual answer's first token too (where the counterfactual answer is one token, that
  is all it needs);
* a `cf` program carries the counterfactual answer's tokens, when it has more than one.

Patches touch prompt positions only, before the first readout position, so a patch's effect
on the two programs is the same intervention; their rows are joined by (site, layer, pos,
head). For one-token answers both metrics give the same difference (the log-sum-exp cancels).
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from actors.plan import ProgramShape
from actors.targets import EncodedPair, Positions

Role = Literal["pair", "clean", "cf"]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One engine program made from pair `source`.

    Attributes:
        source: index of the pair.
        role: `pair` (first_token), `clean` or `cf` (the answer it carries).
        clean_ids / cf_ids: its inputs.
        reads: per readout position, the tokens whose logits are read there (the first is the
            one scored; a `pair` or `clean` program's first position also reads the other
            answer's token and the family's candidates).
    """

    source: int
    role: Role
    clean_ids: list[int]
    cf_ids: list[int]
    reads: list[list[int]]

    @property
    def n_read(self) -> int:
        return len(self.reads)

    def shape(self, pair: EncodedPair, positions: Positions) -> ProgramShape:
        return ProgramShape(
            len(self.clean_ids), tuple(pair.diff), tuple(pair.positions(positions)), self.n_read
        )


def units(pairs: Sequence[EncodedPair], metric: str) -> list[Unit]:
    """The engine programs of the pairs under `metric`, in pair order."""
    out = []
    for g, pair in enumerate(pairs):
        first = [pair.clean_answer_id, pair.cf_answer_id, *pair.candidates]
        if metric == "first_token":
            out.append(Unit(g, "pair", pair.clean_ids, pair.cf_ids, [first]))
            continue
        clean, cf = list(pair.clean_answer_ids), list(pair.cf_answer_ids)
        reads = [first] + [[t] for t in clean[1:]]
        out.append(Unit(g, "clean", pair.clean_ids + clean[:-1], pair.cf_ids + clean[:-1], reads))
        if len(cf) > 1:
            cf_reads = [[t] for t in cf]
            out.append(Unit(g, "cf", pair.clean_ids + cf[:-1], pair.cf_ids + cf[:-1], cf_reads))
    return out


def tokens(members: Sequence[Unit], width: int, device: torch.device) -> Tensor:
    """The `tokens` of `Engine.runs` for units of one (length, n_read): `[prog, width]` for
    `pair` units, else `[prog, n_read, width]`; each position's list is padded with its
    first token (a padded slot is never read as another token)."""
    rows = [[read + [read[0]] * (width - len(read)) for read in u.reads] for u in members]
    out = torch.tensor(rows, device=device)
    return out[:, 0] if members[0].role == "pair" else out


def scores(
    role: Role, logits: Float[Tensor, " row *r k"], lse: Float[Tensor, " row *r"]
) -> tuple[Tensor | None, Tensor | None]:
    """Each row's score of the clean and of the counterfactual answer (None: this role does
    not give it). Positions past a row's own readout (NaN, from `run_plan`) add nothing."""
    if role == "pair":
        return logits[:, 0], logits[:, 1]
    assert logits.dim() == 3, f"{role} rows need per-position readouts, got {logits.shape}"
    total = torch.nansum(logits[:, :, 0] - lse, dim=1)
    if role == "cf":
        return None, total
    return total, logits[:, 0, 1] - lse[:, 0]
