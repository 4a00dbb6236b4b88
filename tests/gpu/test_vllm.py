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
        str(folder),
        max_new_tokens=2,
        gpu_memory_utilization=0.2,
        enforce_eager=True,
        dtype="float32",
    )
    programs = list(iter_programs("binding", 0, 4, 8, style="paper"))
    table = scorer.score(programs, "auto")
    assert table.schema == BEHAVIOR_SCHEMA and table.num_rows == 8
    assert set(table.column("backend").to_pylist()) == {"vllm"}
    # The candidates' scores (asked for directly, or read from the top logprobs) agree with a
    # Hugging Face forward of the same model on what the top-1 is and which candidate wins.
    from actors import load_model
    from actors.behavior import HFScorer

    hf = HFScorer(load_model(str(folder))).score(programs, "auto").to_pylist()
    for mine, want in zip(table.to_pylist(), hf, strict=True):
        for column in ("answer_prefix", "top1", "top1_correct", "choice_correct"):
            assert mine[column] == want[column], (column, mine, want)
