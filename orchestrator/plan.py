"""The plan printed before a sweep: models, programs, shards by kind, and estimates of the
patch rows and patched forward passes (from a sample of programs tokenized by each model's own
tokenizer, so positions are counted as the actors will count them)."""

import dataclasses
import math
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
    forward_passes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _heads(config: Any) -> int:
    return int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1))


def make_plan(spec: Spec, n_layers: dict[str, int]) -> Plan:
    """Count and estimate the work of a spec (tokenizers and configs only, no weights)."""
    programs = sum(len(t.seq_lens) * t.n for t in spec.tasks)
    rows = forwards = 0
    patching = spec.experiments.patching
    if patching is not None:
        from transformers import AutoConfig, AutoTokenizer

        from actors.targets import Skip, encode_program

        for model in spec.models:
            tokenizer = AutoTokenizer.from_pretrained(model.id)
            heads = _heads(AutoConfig.from_pretrained(model.id))
            layers = sum(len(b) for b in layer_blocks(n_layers[model.id], patching.layers, 1))
            per_pos = layers * sum(heads if s == "attn_head" else 1 for s in patching.sites)
            for task in spec.tasks_for("patching"):
                for seq_len in task.seq_lens:
                    sample = list(
                        iter_programs(
                            task.family, spec.seed, seq_len, min(SAMPLE, task.n), **task.options
                        )
                    )
                    n_rows = n_fwd = 0
                    for p in sample:
                        pair = encode_program(tokenizer, p)
                        if isinstance(pair, Skip):
                            continue
                        positions = pair.positions(patching.positions)
                        n_rows += len(positions) * per_pos
                        changed = [x for x in positions if x >= pair.first_diff]
                        n_fwd += 1 + len(changed) * math.ceil(per_pos / patching.batch_size)
                    scale = task.n / max(1, len(sample))
                    rows += round(n_rows * scale)
                    forwards += round(n_fwd * scale)
    return Plan(
        run=spec.run,
        models=[m.id for m in spec.models],
        programs=programs,
        shards=count_shards(spec, n_layers),
        patch_rows=rows,
        forward_passes=forwards,
    )
