"""The vLLM backend's engine, on a GPU machine with the `vllm` extra installed."""

import pytest

from orchestrator.tasks import iter_programs
from tests.tiny import save_tiny_model

pytestmark = pytest.mark.gpu


def test_vllm_scores_a_tiny_model(tmp_path) -> None:
    pytest.importorskip("vllm", reason="the vllm extra is not installed (GPU machines only)")
    from actors.behavior import BEHAVIOR_SCHEMA, VLLMScorer

    folder = save_tiny_model(tmp_path / "llama", "llama", n_layers=2)
    scorer = VLLMScorer(
        str(folder), max_new_tokens=2, gpu_memory_utilization=0.2, enforce_eager=True
    )
    programs = list(iter_programs("binding", 0, 4, 8, style="paper"))
    table = scorer.score(programs)
    assert table.schema == BEHAVIOR_SCHEMA and table.num_rows == 8
    assert set(table.column("backend").to_pylist()) == {"vllm"}
