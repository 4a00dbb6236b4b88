"""The plan printed before a sweep: models, programs, shards by kind, the patching work as the
engine will plan it (`actors.plan`): patch rows, the share that needs no forward, and the
token-layers the passes compute, for each counterfactual kind of each task; the attribution
work: the cells it estimates and the exact patches `verify_top_k` adds; the knockouts; and the
programs the probes read. Counted on a sample of programs tokenized by each model's own
tokenizer, scaled to the task's `n`; configs and tokenizers only, no weights."""

import dataclasses
from collections.abc import Iterator
from typing import Any

from orchestrator.shards import count_shards, counterfactuals, layer_blocks, layer_groups
from orchestrator.spec import Spec
from orchestrator.tasks import iter_programs

SAMPLE = 8  # programs tokenized per (task, seq_len) for the estimates


@dataclasses.dataclass(frozen=True)
class Plan:
    """The work of a spec.

    Attributes:
        shards: kind -> shards, for the kinds the spec runs.
        patch_rows / free_rows / token_layers: exact patching's rows, the rows that need no
            forward, and the token-layers its passes compute.
        attribution_cells: attribution's estimates (one row each).
        verify_patches: the exact patches `verify_top_k` adds (at most 2K per program and site:
            the top K by |estimate| and K others).
        knockout_rows: attention knockouts, one row (and one forward row) each.
        probe_programs: programs the probes read, over every model (one forward each; the
            probes of a shard are fitted on its programs).
    """

    run: str
    models: list[str]
    programs: int
    shards: dict[str, int]
    patch_rows: int
    free_rows: int
    token_layers: int
    attribution_cells: int = 0
    verify_patches: int = 0
    knockout_rows: int = 0
    probe_programs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _heads(config: Any) -> int:
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))


def _samples(spec: Spec, tokenizer: Any, kind: str) -> Iterator[tuple[list[Any], float]]:
    """Per (task, seq_len) of `kind`: the encoded pairs of a sample of its programs (those the
    model skips left out, so they count as none), and the factor that scales it to `n` programs
    and to the task's counterfactual kinds (patching's; one for the other kinds)."""
    from actors.targets import Skip, encode_program

    for task in spec.tasks_for(kind):
        # Every kind is counted as root_value's pairs: an estimate, since another kind patches
        # at its own positions and skips the programs that have no such counterfactual.
        kinds = len(counterfactuals(kind, task))
        for seq_len in task.seq_lens:
            sample = iter_programs(
                task.family, spec.seed, seq_len, min(SAMPLE, task.n), **task.options
            )
            pairs = [encode_program(tokenizer, p) for p in sample]
            scale = task.n * kinds / max(1, len(pairs))
            yield [p for p in pairs if not isinstance(p, Skip)], scale


def _patching_work(spec: Spec, tokenizer: Any, n: int, heads: int) -> tuple[int, int, int]:
    """Patch rows, rows that need no forward, and token-layers of one model."""
    from actors.plan import ProgramShape, build_plan

    patching = spec.experiments.patching
    unlimited = lambda width, context: 1 << 62  # noqa: E731  (batching does not change the work)
    blocks = layer_blocks(n, patching.layers, patching.layers_per_shard)
    rows = free = token_layers = 0
    for pairs, scale in _samples(spec, tokenizer, "patching"):
        shapes = [
            ProgramShape(len(p.clean_ids), tuple(p.diff), tuple(p.positions(patching.positions)))
            for p in pairs
        ]
        for site in patching.sites:
            for block in blocks:
                cost = build_plan(shapes, [site], block, n, heads, unlimited).cost()
                rows += round(cost.patches * scale)
                free += round(cost.free * scale)
                token_layers += round((cost.token_layers + cost.runs) * scale)
    return rows, free, token_layers


def _attribution_work(spec: Spec, tokenizer: Any, n: int, heads: int) -> tuple[int, int]:
    """Cells estimated and exact patches verified, of one model. Positions are counted on the
    program's own tokens (an answer prefix the actor appends is not)."""
    attribution = spec.experiments.attribution
    (layers,) = layer_groups("attribution", attribution, n)
    k = attribution.verify_top_k
    cells = verify = 0
    for pairs, scale in _samples(spec, tokenizer, "attribution"):
        for site in attribution.sites:
            per_program = [
                len(p.positions(attribution.positions))
                * len(layers)
                * (heads if site == "attn_head" else 1)
                for p in pairs
            ]
            cells += round(sum(per_program) * scale)
            verify += round(sum(min(2 * k, c) for c in per_program) * scale)
    return cells, verify


def _knockout_work(spec: Spec, tokenizer: Any, n: int, heads: int) -> int:
    """Knockout rows of one model: per program, its labelled sources x layers x heads x scopes."""
    from actors.knockout import sources

    knockout = spec.experiments.knockout
    layers = sum(len(b) for b in layer_groups("knockout", knockout, n))
    rows = 0
    for pairs, scale in _samples(spec, tokenizer, "knockout"):
        per_scope = sum(len(sources(p)) for p in pairs) * layers * heads
        rows += round(per_scope * len(knockout.scopes) * scale)
    return rows


def make_plan(spec: Spec, n_layers: dict[str, int]) -> Plan:
    """Count and estimate the work of a spec (tokenizers and configs only, no weights)."""
    programs = sum(len(t.seq_lens) * t.n for t in spec.tasks)
    work = {"patch_rows": 0, "free_rows": 0, "token_layers": 0}
    work |= {"attribution_cells": 0, "verify_patches": 0, "knockout_rows": 0}
    patching, attribution = spec.experiments.patching, spec.experiments.attribution
    knockout = spec.experiments.knockout
    if spec.experiments.probes is not None:
        per_model = sum(len(t.seq_lens) * t.n for t in spec.tasks_for("probes"))
        work["probe_programs"] = per_model * len(spec.models)
    if patching is not None or attribution is not None or knockout is not None:
        from transformers import AutoConfig, AutoTokenizer

        for model in spec.models:
            tokenizer = AutoTokenizer.from_pretrained(model.id)
            heads = _heads(AutoConfig.from_pretrained(model.id))
            n = n_layers[model.id]
            if patching is not None:
                rows, free, token_layers = _patching_work(spec, tokenizer, n, heads)
                work["patch_rows"] += rows
                work["free_rows"] += free
                work["token_layers"] += token_layers
            if attribution is not None:
                cells, verify = _attribution_work(spec, tokenizer, n, heads)
                work["attribution_cells"] += cells
                work["verify_patches"] += verify
            if knockout is not None:
                work["knockout_rows"] += _knockout_work(spec, tokenizer, n, heads)
    return Plan(
        run=spec.run,
        models=[m.id for m in spec.models],
        programs=programs,
        shards=count_shards(spec, n_layers),
        **work,
    )
