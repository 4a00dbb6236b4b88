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
