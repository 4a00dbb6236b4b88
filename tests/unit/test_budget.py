"""`batch_size: auto`: bytes per row from the model's shapes, rows from the budget."""

import torch
from transformers import AutoModelForCausalLM

from actors.arch import arch_map
from actors.budget import CPU_BUDGET, Footprint, auto_budget, row_limit
from actors.plan import Reads
from tests.tiny import tiny_config


def footprint(dtype_bytes: int = 4) -> Footprint:
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", 100, n_layers=3, d_model=64))
    return Footprint.of(arch_map(model), model.config, dtype_bytes)


def test_footprint_counts_the_shapes() -> None:
    fp = footprint()
    d, width, d_ff, kv, d_head, layers = 64, 4 * 16, 128, 2, 16, 3
    assert fp.per_token == 4 * (4 * d + 2 * width + 3 * d_ff)
    assert fp.per_context == 4 * layers * 2 * 2 * kv * d_head
    assert fp.per_score == 4 * 4
    assert fp.row_bytes(5, 20) == 5 * fp.per_token + 20 * fp.per_context + 5 * 20 * fp.per_score
    assert footprint(2).per_token == fp.per_token // 2
    reads = Reads(clean_resid=(0, 1), cf_resid=(0,), cf_z=(1,), cf_mlp=())
    kept = 4 * (3 * d + width) + fp.per_context // 2
    assert fp.stack_bytes(reads, 10) == 10 * kept + 2 * fp.row_bytes(10, 10)


def test_row_limit_is_the_smaller_of_budget_and_batch_size() -> None:
    fp = footprint()
    per_row = fp.row_bytes(7, 30)
    assert row_limit(fp, 10 * per_row, None)(7, 30) == 10
    assert row_limit(fp, 10 * per_row + per_row - 1, None)(7, 30) == 10
    assert row_limit(fp, 10 * per_row, 4)(7, 30) == 4
    assert row_limit(fp, None, 6)(7, 30) == 6
    assert row_limit(fp, 1, None)(7, 30) == 1  # never zero: one row always runs
    # Longer passes hold fewer rows.
    limit = row_limit(fp, 1 << 24, None)
    assert limit(60, 60) < limit(10, 60) < limit(1, 60)


def test_auto_budget_on_cpu_is_capped() -> None:
    budget = auto_budget(torch.device("cpu"))
    assert 0 < budget <= CPU_BUDGET
