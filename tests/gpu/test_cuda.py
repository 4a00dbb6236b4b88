"""Checks that need a CUDA device; they skip with the reason elsewhere (see conftest)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.gpu


def test_tiny_model_gives_the_same_logits_on_cuda_and_cpu() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (3, 20))
    with torch.no_grad():
        cpu = model(input_ids=ids).logits
        gpu = model.to("cuda")(input_ids=ids.to("cuda")).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_engine_on_cuda_equals_one_forward_per_patch(tmp_path) -> None:
    from actors import Patcher, load_model
    from orchestrator.tasks import generate
    from tests import reference
    from tests.tiny import save_tiny_model

    lm = load_model(str(save_tiny_model(tmp_path / "m", "qwen3", n_layers=4)), device="cuda")
    programs = [generate("binding", 1, 5, i, style="paper") for i in (2, 7)]
    patcher = Patcher(lm, batch_size="auto")
    (wave,) = patcher.run(programs, ["resid_pre", "attn_head"], None, "all")
    assert patcher.budget_bytes > 0  # sized from the device's free memory
    for i, patch in enumerate(wave.plan.patches[::7]):
        pair = wave.pairs[patch.program][1]
        want = reference.patched_logits(
            lm.model, pair.clean_ids, pair.cf_ids, patch.site, patch.layer, patch.pos, patch.head
        )
        got = wave.read.logits[i * 7]
        torch.testing.assert_close(
            got, want[[pair.clean_answer_id, pair.cf_answer_id]], atol=1e-3, rtol=1e-3
        )
