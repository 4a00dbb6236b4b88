"""From a wave's readouts to patching rows (`actors.patching.PATCHING_SCHEMA`): each pair's
scores in its clean and counterfactual runs, each patch's patched score, correctness, and the
normalized effect. Scores come from `actors.forcing` (a logit under `first_token`, a summed
log-probability under `answer_logprob`); a row's logit diffs are the counterfactual answer's
score minus the clean one's."""

import dataclasses
from collections.abc import Sequence

import torch

from actors.engine import Stack
from actors.forcing import Unit, scores
from actors.plan import Plan
from actors.readout import Read
from actors.targets import EncodedPair
from orchestrator.tasks.counterfactuals import ROOT_VALUE

# The runs of the engine programs of each (length, n_read), and each program's slot there.
Stacks = dict[tuple[int, int], tuple[Stack, dict[int, int]]]
MIN_DENOMINATOR = 1e-3  # |cf - clean| logit-diff gap below which norm_effect is null


@dataclasses.dataclass(frozen=True)
class Wave:
    """Programs patched together: the pairs, their engine programs (`actors.forcing`; the
    plan's programs), per patch (in plan order) its readout of (clean answer, counterfactual
    answer), the programs' runs, and per pair whether the clean and the counterfactual answer
    beat the other candidates."""

    plan: Plan
    pairs: list[tuple[dict, EncodedPair]]
    units: list[Unit]
    read: Read
    stacks: Stacks
    choices: list[tuple[bool, bool]]


def program_columns(model: str, prog: dict, pair: EncodedPair) -> dict:
    """The columns a program's rows share, in patching and attribution alike."""
    return {
        "model": model,
        "task": prog["task"],
        "seq_len": prog["seq_len"],
        "program": prog["index"],
        "clean_answer": prog["answer"],
        "cf_answer": prog["cf_answer"],
        "answer_prefix": pair.prefix,
        # Where the intervention's values come from (`Patcher.encode`; root_value by default).
        "counterfactual": prog.get("counterfactual", ROOT_VALUE),
    }


def run_scores(
    units: Sequence[Unit], stacks: Stacks, n_pairs: int, run: str
) -> list[list[float | None]]:
    """Per pair, [score of the clean answer, score of the counterfactual answer] in the clean
    (`run="clean"`) or counterfactual run."""
    out: list[list[float | None]] = [[None, None] for _ in range(n_pairs)]
    for i, u in enumerate(units):
        stack, slot_of = stacks[(len(u.clean_ids), u.n_read)]
        s = slot_of[i]
        logits, lse = getattr(stack, f"{run}_logits"), getattr(stack, f"{run}_lse")
        clean, cf = scores(u.role, logits[s : s + 1], lse[s : s + 1])
        if clean is not None:
            out[u.source][0] = clean.item()
        if cf is not None and (u.role == "cf" or out[u.source][1] is None):
            out[u.source][1] = cf.item()
    return out


def _patch_scores(wave: Wave) -> tuple[list[int], list[float], list[int]]:
    """The rows of a wave: per patch of a `pair` or `clean` program (in plan order), its
    index, the patched score difference (counterfactual answer minus clean), and the top-1
    token at the compared position. A `cf` program's patch joins its `clean` sibling's by
    (site, layer, pos, head)."""
    plan, read = wave.plan, wave.read
    role = [wave.units[p.program].role for p in plan.patches]
    clean = torch.full((len(plan.patches),), float("nan"))
    cf = torch.full((len(plan.patches),), float("nan"))
    for r in ("pair", "clean", "cf"):
        rows = [i for i, x in enumerate(role) if x == r]
        if rows:
            index = torch.tensor(rows)
            c, f = scores(r, read.logits[index].cpu(), read.lse[index].cpu())
            if c is not None:
                clean[index] = c.float()
            if f is not None:
                cf[index] = f.float()
    sibling = {}
    for i, p in enumerate(plan.patches):
        if role[i] == "cf":
            sibling[(wave.units[p.program].source, p.site, p.layer, p.pos, p.head)] = i
    kept, diffs = [], []
    for i, p in enumerate(plan.patches):
        if role[i] == "cf":
            continue
        j = sibling.get((wave.units[p.program].source, p.site, p.layer, p.pos, p.head), i)
        kept.append(i)
        diffs.append(cf[j].item() - clean[i].item())  # as the runs' diffs: in double
    top = read.top if read.top.dim() == 1 else read.top[:, 0]
    return kept, diffs, top[kept].tolist()


def append_rows(columns: dict[str, list], model: str, metric: str, wave: Wave, tokenizer) -> None:
    """Rows of one wave, in its plan's patch order."""
    n = len(wave.pairs)
    clean_run = run_scores(wave.units, wave.stacks, n, "clean")
    cf_run = run_scores(wave.units, wave.stacks, n, "cf")
    tops: dict[int, tuple[int, int]] = {}
    for i, u in enumerate(wave.units):
        if u.role != "cf":
            stack, slot_of = wave.stacks[(len(u.clean_ids), u.n_read)]
            at = (slot_of[i],) if u.role == "pair" else (slot_of[i], 0)
            tops[u.source] = (int(stack.clean_top[at]), int(stack.cf_top[at]))
    per_program = []
    for g, (prog, pair) in enumerate(wave.pairs):
        top1, cf_top1 = tops[g]
        clean_diff = clean_run[g][1] - clean_run[g][0]
        cf_diff = cf_run[g][1] - cf_run[g][0]
        per_program.append(
            {
                **program_columns(model, prog, pair),
                "metric": metric,
                "top1": tokenizer.decode([top1]),
                "top1_candidate": top1 in pair.candidates,
                "top1_correct": top1 == pair.clean_answer_id,
                "choice_correct": wave.choices[g][0],
                "cf_top1_correct": cf_top1 == pair.cf_own_id,
                "cf_choice_correct": wave.choices[g][1],
                "clean_logit_diff": clean_diff,
                "cf_logit_diff": cf_diff,
                "contrast_answer": prog.get("contrast_answer", prog["cf_answer"]),
                # A control's runs share their answer: its scale is the root-value
                # counterfactual's run (`Patcher.encode`).
                "contrast_logit_diff": (
                    prog.get("contrast_logit_diff") if pair.same_answer else cf_diff
                ),
            }
        )
    kept, patched, flipped = _patch_scores(wave)
    for i, diff, top in zip(kept, patched, flipped, strict=True):
        patch = wave.plan.patches[i]
        g = wave.units[patch.program].source
        fixed, pair = per_program[g], wave.pairs[g][1]
        for key, value in fixed.items():
            columns[key].append(value)
        columns["site"].append(patch.site)
        columns["layer"].append(patch.layer)
        columns["head"].append(patch.head)
        columns["pos"].append(patch.pos)
        columns["token"].append(pair.tokens[patch.pos])
        columns["label"].append(pair.labels[patch.pos])
        columns["patched_logit_diff"].append(diff)
        contrast, clean = fixed["contrast_logit_diff"], fixed["clean_logit_diff"]
        denom = None if contrast is None else contrast - clean
        columns["norm_effect"].append(
            (diff - clean) / denom if denom is not None and abs(denom) >= MIN_DENOMINATOR else None
        )
        # A control's answer is the clean one: its patch flips when that leaves the top.
        columns["flipped"].append(
            top != pair.clean_answer_id if pair.same_answer else top == pair.cf_answer_id
        )
