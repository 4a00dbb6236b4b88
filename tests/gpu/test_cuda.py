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


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_attribution_on_cuda(tmp_path, quantization) -> None:
    """Estimates on CUDA equal the CPU's (unquantized), and quantized models pass gradients
    back through bitsandbytes' CUDA kernels; the exact checks run there too."""
    from actors import load_model
    from actors.attribution import Attributor
    from orchestrator.tasks import iter_programs
    from tests.tiny import save_tiny_model

    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    folder = save_tiny_model(tmp_path / "m", "llama", n_layers=3)
    programs = list(iter_programs("binding", 2, 6, 3))
    cpu = Attributor(load_model(str(folder), dtype="float32", device="cpu"), attention_fix=True)
    want = cpu.attribute(programs, ["resid_pre", "attn_head"], None, "all").column("estimate")
    lm = load_model(str(folder), dtype="float32", device="cuda", quantization=quantization)
    got = Attributor(lm, attention_fix=True, grad_drop=True).attribute(
        programs, ["resid_pre", "attn_head"], None, "all", verify_top_k=3
    )
    estimate = torch.tensor(got.column("estimate").to_pylist())
    reference = torch.tensor(want.to_pylist())
    if quantization == "none":
        torch.testing.assert_close(estimate, reference, atol=1e-3, rtol=1e-3)
    else:
        assert float(torch.corrcoef(torch.stack([estimate, reference]))[0, 1]) > 0.8
    assert got.column("exact").null_count == got.num_rows - 2 * 3 * 2 * len(programs)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_knockout_on_cuda_equals_the_cpu(tmp_path, implementation) -> None:
    """SDPA's and eager's CUDA kernels take the knockout's float mask with -inf entries: the
    effects equal the CPU's."""
    from actors import load_model
    from actors.knockout import Knocker
    from orchestrator.tasks import iter_programs
    from tests.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", "qwen3", n_layers=4)
    programs = list(iter_programs("binding", 2, 6, 3))
    values = {}
    for device in ("cpu", "cuda"):
        lm = load_model(str(folder), dtype="float32", device=device)
        lm.model.set_attn_implementation(implementation)
        table = Knocker(lm).knockout(programs, scope="later")
        values[device] = torch.tensor(table.column("knocked_logit_diff").to_pylist())
    torch.testing.assert_close(values["cuda"], values["cpu"], atol=1e-3, rtol=1e-3)
