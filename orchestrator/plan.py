"""The plan printed before a sweep: models, programs, shards by kind, and the patching work as
the engine will plan it (`actors.plan`): patch rows, the share that needs no forward, and the
token-layers the passes compute. Counted on a sample of programs tokenized by each model's own
tokenizer, scaled to the task's `n`; configs and tokenizers only, no weights."""

import dataclasses
from typing import Any

from orchestrator.shards import count_shards, layer_blocks
from orchestrator.spec import Spec
from orchestrator.tasks import iter_programs

SAMPLE = 8  # programs tokenized per (task, seq_len) for the estimates


@dataclasses.dataclass(frozen=True)
class Plan:
    run: str
    models: list[str]
    programs: int
    shards: dict[str, int]
    patch_rows: int
    free_rows: int
    token_layers: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _heads(config: Any) -> int:
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))


def make_plan(spec: Spec, n_layers: dict[str, int]) -> Plan:
    """Count and estimate the work of a spec (tokenizers and configs only, no weights)."""
    programs = sum(len(t.seq_lens) * t.n for t in spec.tasks)
    rows = free = token_layers = 0
    patching = spec.experiments.patching
    if patching is not None:
        from transformers import AutoConfig, AutoTokenizer

        from actors.plan import ProgramShape, build_plan
        from actors.targets import Skip, encode_program

        unlimited = lambda width, context: 1 << 62  # noqa: E731  (batching does not change the work)
        for model in spec.models:
            tokenizer = AutoTokenizer.from_pretrained(model.id)
            heads = _heads(AutoConfig.from_pretrained(model.id))
            n = n_layers[model.id]
            blocks = layer_blocks(n, patching.layers, patching.layers_per_shard)
            for task in spec.tasks_for("patching"):
                for seq_len in task.seq_lens:
                    sample = iter_programs(
                        task.family, spec.seed, seq_len, min(SAMPLE, task.n), **task.options
                    )
                    pairs = [encode_program(tokenizer, p) for p in sample]
                    shapes = [
                        ProgramShape(
                            len(p.clean_ids), tuple(p.diff), tuple(p.positions(patching.positions))
                        )
                        for p in pairs
                        if not isinstance(p, Skip)
                    ]
                    # Scaled by the sample's size: programs the model skips count as none.
                    scale = task.n / max(1, len(pairs))
                    for site in patching.sites:
                        for block in blocks:
                            cost = build_plan(shapes, [site], block, n, heads, unlimited).cost()
                            rows += round(cost.patches * scale)
                            free += round(cost.free * scale)
                            token_layers += round((cost.token_layers + cost.runs) * scale)
    return Plan(
        run=spec.run,
        models=[m.id for m in spec.models],
        programs=programs,
        shards=count_shards(spec, n_layers),
        patch_rows=rows,
        free_rows=free,
        token_layers=token_layers,
    )
